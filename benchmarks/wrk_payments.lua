-- wrk script: POST payment-sized JSON bodies with unique ids.
-- Environment: EUM_WRK_DATA (file: line 1 member ids, line 2 merchant ids weighted by
-- sales, space-separated), EUM_WRK_TOKEN (bearer key), EUM_WRK_PATH (default /v1/payments),
-- EUM_WRK_PREFIX (payment id prefix, unique per run).
local members, merchants = {}, {}
local counter = 0
local prefix = os.getenv("EUM_WRK_PREFIX") or "wrk"
local path = os.getenv("EUM_WRK_PATH") or "/v1/payments"
local token = os.getenv("EUM_WRK_TOKEN") or ""
local thread_tag = "t"

local function load()
  local f = assert(io.open(os.getenv("EUM_WRK_DATA"), "r"))
  for id in f:read("*l"):gmatch("%S+") do members[#members + 1] = id end
  for id in f:read("*l"):gmatch("%S+") do merchants[#merchants + 1] = id end
  f:close()
end

function setup(thread)
  counter = counter + 1
  thread:set("thread_tag", "t" .. counter)
end

function init(args)
  load()
  math.randomseed(os.time() + #thread_tag * 7919 + (tonumber(thread_tag:sub(2)) or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
end

local function amount()
  -- lognormal, median 12,300 won, sigma 0.8 (mean ~17,000), rounded to 100 won
  local u1, u2 = math.random(), math.random()
  if u1 < 1e-12 then u1 = 1e-12 end
  local z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
  local a = math.floor(math.exp(math.log(12300) + 0.8 * z) / 100) * 100
  if a < 1000 then a = 1000 end
  if a > 2000000 then a = 2000000 end
  return a
end

function request()
  counter = counter + 1
  local second = counter % 3600
  local body = string.format(
    '{"payment_id":"%s-%s-%d","member_id":"%s","merchant_id":"%s","amount":%d,"occurred_at":"2025-11-14T12:%02d:%02d+09:00"}',
    prefix, thread_tag, counter, members[math.random(#members)], merchants[math.random(#merchants)], amount(),
    math.floor(second / 60), second % 60)
  return wrk.format(nil, path, nil, body)
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("EUM_WRK_SUMMARY") or "/dev/null", "w")
  out:write(string.format('{"requests": %d, "duration_us": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
  out:close()
end
