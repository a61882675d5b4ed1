"""Fair share within a priority: each queue is served round-robin across lanes.

A lane is (workload, submitter), the submitter being the job's API token when it came with
one, else its user. Without this, one token's flood of 2,000 jobs sat in front of every other
user's job of the same priority.

The order is made at enqueue time, in the RQ list itself, so RQ stays the queue: one list per
priority, which workers BLPOP as before and which `rq info` and django-rq's admin show as it
really is. Each lane gets a virtual round per job (start-time fair queueing): a new job's round
is its lane's last round + 1, but never less than the round of the job being served now (the
list head's), so a lane that was idle joins at the head instead of at the back, and a lane
that flooded only competes with itself. The job is then inserted before the first queued job
of a later round (LINSERT), or pushed at the back. Ranks (round × 2^21 + an arrival sequence,
so ties keep arrival order) live in a sorted set beside the list, `<queue key>:fair`.

One Lua script does all of it inside RQ's enqueue transaction. Ranks of entries no longer on
the list (popped by a worker, removed by `forget`, or by anything else that LREMs) are
skipped when met as a pivot and trimmed below the head's rank, and everything is dropped
whenever the list runs empty, so the extra keys stay small.

Entries pushed without a lane are not placed: they go where RQ puts them, unranked, and
placed jobs are inserted around them as if they were not there. Those are `at_front`
enqueues (LPUSH, at the head as RQ means), other queues (webhooks), and the jobs RQ's
scheduler moves onto the queue when they are due: start times and parked jobs (Retry-After,
full caps, an open breaker).
RQ 2.12's scheduler builds a plain `rq.Queue` for that (`RQScheduler.enqueue_scheduled_jobs`),
with no hook for a queue class, so those jobs are appended at the back, FIFO, behind a flood;
making them fair would mean replacing the scheduler's loop.

The script touches RQ's list key and our keys, which share no hash slot: like RQ itself, this
needs one Redis primary, not a Cluster (see jobs.flow).
"""

from __future__ import annotations

from contextvars import ContextVar

from django_rq.queues import DjangoRQ
from redis.client import Pipeline
from rq.job import Job as RQJob

from jobs.models import Job

# The RQ job's meta key that carries its lane to the push.
LANE_META = "lane"
# How deep under the head the script looks for a placed entry to read the current round from
# (the head itself may be an unplaced at_front or scheduled entry).
HEAD_SCAN = 16
# Stale pivots skipped per enqueue before the job is simply appended.
PIVOT_TRIES = 8

# KEYS: the RQ list, its ranks (zset), lanes (hash lane -> "round job_id"), clock (hash: round,
# seq). ARGV: job id, lane, HEAD_SCAN, PIVOT_TRIES. Returns the list's length.
_PUSH = """
local list, ranks, lanes, clock = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, lane = ARGV[1], ARGV[2]
local spread = 2097152
local now_round = nil
if redis.call('LLEN', list) == 0 then
  -- Nothing queued: every rank is stale, and every lane starts afresh.
  redis.call('DEL', ranks, lanes, clock)
  now_round = 0
else
  for _, member in ipairs(redis.call('LRANGE', list, 0, tonumber(ARGV[3]) - 1)) do
    local rank = redis.call('ZSCORE', ranks, member)
    if rank then
      rank = tonumber(rank)
      now_round = math.floor(rank / spread)
      -- Placed entries are in rank order on the list, so lower ranks are no longer on it.
      redis.call('ZREMRANGEBYSCORE', ranks, '-inf', '(' .. string.format('%.0f', rank))
      break
    end
  end
  now_round = now_round or tonumber(redis.call('HGET', clock, 'round') or '0')
end
local round = now_round
local last = redis.call('HGET', lanes, lane)
if last then
  local gap = string.find(last, ' ')
  local last_round = tonumber(string.sub(last, 1, gap - 1))
  -- Only while the lane's latest job is still ranked: a lane whose jobs were cancelled is
  -- not held back by rounds nobody will serve.
  if last_round >= round and redis.call('ZSCORE', ranks, string.sub(last, gap + 1)) then
    round = last_round + 1
  end
end
if round > tonumber(redis.call('HGET', clock, 'round') or '0') then
  redis.call('HSET', clock, 'round', string.format('%.0f', round))
end
local seq = redis.call('HINCRBY', clock, 'seq', 1) % spread
local rank = string.format('%.0f', round * spread + seq)
redis.call('ZADD', ranks, rank, id)
redis.call('HSET', lanes, lane, string.format('%.0f', round) .. ' ' .. id)
for _ = 1, tonumber(ARGV[4]) do
  local pivot = redis.call('ZRANGEBYSCORE', ranks, '(' .. rank, '+inf', 'LIMIT', 0, 1)[1]
  if not pivot then
    return redis.call('RPUSH', list, id)
  end
  local length = redis.call('LINSERT', list, 'BEFORE', pivot, id)
  if length > 0 then
    return length
  end
  redis.call('ZREM', ranks, pivot)
end
-- Too many stale pivots: appended, and unranked so it cannot break the order of the rest.
redis.call('ZREM', ranks, id)
return redis.call('RPUSH', list, id)
"""

# The lane of the enqueue in progress, from FairQueue._enqueue_async_job to push_job_id (RQ
# passes the push only the id). A context variable: each thread and task has its own.
_pushing: ContextVar[str | None] = ContextVar("fairshare_lane", default=None)


def lane_of(job: Job) -> str:
    """The lane a job queues in: its workload and its API token, else its user."""
    if job.api_token_id is not None:
        return f"{job.workload_id}/token:{job.api_token_id}"
    return f"{job.workload_id}/user:{job.submitted_by_id or '-'}"


def ranks_key(queue_key: str) -> str:
    return f"{queue_key}:fair"


def _keys(queue_key: str) -> list[str]:
    base = ranks_key(queue_key)
    return [queue_key, base, f"{base}:lanes", f"{base}:clock"]


def forget(pipe: Pipeline, queue_key: str, job_id: str) -> None:
    """Drop a job's rank, in the pipeline that takes its entry off the queue (LREM)."""
    pipe.zrem(ranks_key(queue_key), job_id)


class FairQueue(DjangoRQ):
    """An RQ queue that places jobs with a lane in their meta (`LANE_META`) round-robin across
    lanes; every other push is RQ's own.

    Goes into RQ below its public API: `_enqueue_async_job` is where RQ has the job and calls
    `push_job_id` with only its id. tests/jobs/test_fair_share.py fails if an RQ upgrade
    stops calling `push_job_id` from there.
    """

    def _enqueue_async_job(
        self,
        job: RQJob,
        pipeline: Pipeline | None = None,
        at_front: bool = False,
        unique: bool = False,
    ) -> RQJob:
        token = _pushing.set(job.meta.get(LANE_META))
        try:
            return super()._enqueue_async_job(
                job, pipeline=pipeline, at_front=at_front, unique=unique
            )
        finally:
            _pushing.reset(token)

    def push_job_id(
        self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False
    ) -> None:
        lane = _pushing.get()
        client = pipeline if pipeline is not None else self.connection
        if lane is None or at_front:
            # Unplaced: a rank left from an earlier entry under this id must not make it a
            # pivot where it now stands.
            client.zrem(ranks_key(self.key), job_id)
            super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
            return
        args = [job_id, lane, HEAD_SCAN, PIVOT_TRIES]
        if pipeline is not None:
            # EVAL with the script's text, not redis-py's Script: in a pipeline that asks
            # SCRIPT EXISTS first, a round trip of its own on every enqueue. Redis keeps the
            # compiled script by its SHA1, so sending the text costs only the bytes.
            pipeline.eval(_PUSH, len(_keys(self.key)), *_keys(self.key), *args)
            return
        script = self.connection.register_script(_PUSH)  # just its SHA1: loaded on first use
        script(keys=_keys(self.key), args=args, client=client)
