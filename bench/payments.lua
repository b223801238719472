-- wrk script: every request is a payment with its own Idempotency-Key.
--
--   BENCH_RUN_ID=r1 BENCH_API_KEY=... BENCH_RECORDS=/tmp/r1.txt \
--     wrk -t1 -c16 -d15s -s bench/payments.lua http://127.0.0.1:8000
--
-- BENCH_THINK_MS (optional) paces every connection, see delay() below.
-- Each request carries its send time in X-Request-ID (b<sec>.<usec>-<thread>-<n>); the
-- apps echo it, so each response yields its own latency and the second it was sent.
-- done() writes one line per response ("r <sent> <latency_us> <status>"), the requests
-- sent per second ("s <sec> <count>") and wrk's summary to BENCH_RECORDS, for
-- bench/load.py to parse. Requests that never got an answer are the difference between
-- "s" and "r" lines.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } bench_timeval_t;
int gettimeofday(bench_timeval_t *tv, void *tz);
]]
local tv = ffi.new("bench_timeval_t")

local function now()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec), tonumber(tv.tv_usec)
end

local run_id = os.getenv("BENCH_RUN_ID") or "bench"
local auth = "Bearer " .. (os.getenv("BENCH_API_KEY") or "")
local records_path = os.getenv("BENCH_RECORDS")
local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "0")
local body = '{"amount": "25.99", "currency": "USD", "payment_method": "card"}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + thread_id)
  sent_count = 0
  unmatched = 0
  records = {}
  sent = {}
end

-- With BENCH_THINK_MS each connection is a client that waits a random think time
-- (uniform, that mean) before each request: a paced load instead of as fast as the
-- server answers. Keep 2x the mean under the server's keep-alive timeout, or idle
-- connections get closed under the client and requests are lost in between.
if think_ms > 0 then
  function delay()
    return math.random() * 2 * think_ms
  end
end

function request()
  sent_count = sent_count + 1
  local sec, usec = now()
  sent[sec] = (sent[sec] or 0) + 1
  local headers = {
    ["Authorization"] = auth,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("%s-%d-%d", run_id, thread_id, sent_count),
    ["X-Request-ID"] = string.format("b%d.%06d-%d-%d", sec, usec, thread_id, sent_count),
  }
  return wrk.format("POST", "/v1/payments", headers, body)
end

function response(status, headers, _)
  local sec, usec = now()
  local rid = headers["X-Request-ID"] or headers["x-request-id"] or headers["X-Request-Id"]
  local s, u = string.match(rid or "", "^b(%d+)%.(%d+)%-")
  if not s then
    unmatched = unmatched + 1
    return
  end
  local latency = (sec - tonumber(s)) * 1000000 + (usec - tonumber(u))
  records[#records + 1] = string.format("r %s.%s %d %d", s, u, latency, status)
end

function done(summary, latency, _)
  if not records_path then
    return
  end
  local f = assert(io.open(records_path, "w"))
  local e = summary.errors
  f:write(string.format("summary duration_us %d\n", summary.duration))
  f:write(string.format("summary requests %d\n", summary.requests))
  for _, name in ipairs({ "connect", "read", "write", "status", "timeout" }) do
    f:write(string.format("summary errors_%s %d\n", name, e[name]))
  end
  for _, p in ipairs({ 50, 90, 99 }) do
    f:write(string.format("summary latency_p%d_us %d\n", p, latency:percentile(p)))
  end
  for _, thread in ipairs(threads) do
    for _, line in ipairs(thread:get("records")) do
      f:write(line, "\n")
    end
    for sec, n in pairs(thread:get("sent")) do
      f:write(string.format("s %d %d\n", sec, n))
    end
    f:write(string.format("summary unmatched %d\n", thread:get("unmatched")))
  end
  f:close()
end
