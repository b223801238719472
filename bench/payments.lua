-- wrk script: every request is a payment with its own Idempotency-Key.
--
--   BENCH_RUN_ID=r1 BENCH_API_KEY=... BENCH_RECORDS=/tmp/r1.txt \
--     wrk -t1 -c16 -d15s -s bench/payments.lua http://127.0.0.1:8000
--
-- BENCH_THINK_MS (optional) paces every connection, see delay() below.
-- BENCH_REFUND_IDS (optional) names a file of payment ids, one a line: then every
-- request is instead a partial refund (BENCH_REFUND_AMOUNT, default 5.00) of the next
-- payment of the file, its own Idempotency-Key, each payment refunded once. With
-- BENCH_THREADS wrk threads, thread k takes lines k, k + BENCH_THREADS, ... When a
-- thread has had an answer for each of its payments, its connections stay idle and it
-- appends its number to BENCH_DONE (if set): the driver then stops wrk early.
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
local refund_ids_path = os.getenv("BENCH_REFUND_IDS")
local refund_body = string.format('{"amount": "%s"}', os.getenv("BENCH_REFUND_AMOUNT") or "5.00")
local thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")
local done_path = os.getenv("BENCH_DONE")
-- An idle connection waits this long (ms) for a request that will never come.
local PARKED_MS = 24 * 3600 * 1000

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + thread_id)
  sent_count = 0
  unmatched = 0
  answered = 0
  taken = 0
  verified = thread_id ~= 1 -- see request()
  records = {}
  sent = {}
  payment_ids = nil
  if refund_ids_path then
    payment_ids = {}
    local line_number = 0
    for line in io.lines(refund_ids_path) do
      line_number = line_number + 1
      if line ~= "" and (line_number - 1) % thread_count == thread_id - 1 then
        payment_ids[#payment_ids + 1] = line
      end
    end
  end
end

-- With BENCH_THINK_MS each connection is a client that waits a random think time
-- (uniform, that mean) before each request: a paced load instead of as fast as the
-- server answers. Keep 2x the mean under the server's keep-alive timeout, or idle
-- connections get closed under the client and requests are lost in between.
-- In refund mode a connection takes the next payment before each request (wrk calls
-- delay() just before request(), and the two may interleave across connections), and
-- parks itself when none is left.
if think_ms > 0 or refund_ids_path then
  function delay()
    if payment_ids then
      if taken >= #payment_ids then
        return PARKED_MS
      end
      taken = taken + 1
    end
    return think_ms > 0 and math.random() * 2 * think_ms or 0
  end
end

local function headers_at(sec, usec, n)
  return {
    ["Authorization"] = auth,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("%s-%d-%d", run_id, thread_id, n),
    ["X-Request-ID"] = string.format("b%d.%06d-%d-%d", sec, usec, thread_id, n),
  }
end

function request()
  local sec, usec = now()
  if not verified then
    -- wrk calls request() once in the first thread before any connection exists, only
    -- to check what it returns: that request is never sent, so it counts for nothing.
    verified = true
    local path = payment_ids and "/v1/payments/pay_verify/refunds" or "/v1/payments"
    return wrk.format("POST", path, headers_at(sec, usec, 0), body)
  end
  sent_count = sent_count + 1
  sent[sec] = (sent[sec] or 0) + 1
  local headers = headers_at(sec, usec, sent_count)
  if payment_ids then
    -- Only after a socket error can a connection send without taking a payment first:
    -- then it asks for one that does not exist (a 404, counted as an error).
    local id = sent_count <= taken and payment_ids[sent_count] or "pay_none"
    local path = string.format("/v1/payments/%s/refunds", id)
    return wrk.format("POST", path, headers, refund_body)
  end
  return wrk.format("POST", "/v1/payments", headers, body)
end

function response(status, headers, _)
  local sec, usec = now()
  answered = answered + 1
  if payment_ids and answered == #payment_ids and done_path then
    local f = assert(io.open(done_path, "a"))
    f:write(string.format("%d\n", thread_id))
    f:close()
  end
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
