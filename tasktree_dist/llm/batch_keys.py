"""Every Redis key batch mode writes, built here and nowhere else (one place to change their layout). All carry a
TTL (TASKTREE_LLM_BATCH_TTL_S, refreshed when written):

  tasktree:batch:pending:<base url>|<model>   LIST  request lines waiting for their batch (+ ":since", ms)
  tasktree:batch:index:pending                ZSET  scopes with a pending batch, by when it started
  tasktree:batch:sealed:<token>               LIST  a pending batch taken by the process that submits it
  tasktree:batch:index:sealed                 ZSET  "<token>\\n<scope>" of sealed batches not yet recorded as created
  tasktree:batch:submitting:<token>           STR   the process submitting a sealed batch (a lease)
  tasktree:batch:b:<batch id>                 HASH  scope, base_url, model, status, count
  tasktree:batch:index:open                   ZSET  batches at the provider whose calls are not all answered
  tasktree:batch:ids:<batch id>               LIST  its custom ids
  tasktree:batch:added:<custom id>            STR   the call is in a batch; its value is the run to resume ("" none)
  tasktree:batch:of:<custom id>               STR   the call's batch id, once submitted
  tasktree:batch:result:<custom id>           STR   JSON {"ok", "body" (the chat completion) | "error", "batch"}
  tasktree:batch:lease:<batch id>             STR   the one process polling the batch (renewed each poll)
  tasktree:batch:nobatch:<base url>           STR   the provider answered 404: its calls go live (a day)
"""

from __future__ import annotations

KEY = "tasktree:batch:"
PENDING_INDEX = f"{KEY}index:pending"
SEALED_INDEX = f"{KEY}index:sealed"
OPEN_INDEX = f"{KEY}index:open"


def pending(scope: str) -> str:
    return f"{KEY}pending:{scope}"


def pending_since(scope: str) -> str:
    return f"{KEY}pending:{scope}:since"


def sealed(token: str) -> str:
    return f"{KEY}sealed:{token}"


def submitting(token: str) -> str:
    return f"{KEY}submitting:{token}"


def record(batch_id: str) -> str:
    return f"{KEY}b:{batch_id}"


def ids(batch_id: str) -> str:
    return f"{KEY}ids:{batch_id}"


def added(custom_id: str) -> str:
    return f"{KEY}added:{custom_id}"


def of(custom_id: str) -> str:
    return f"{KEY}of:{custom_id}"


def result(custom_id: str) -> str:
    return f"{KEY}result:{custom_id}"


def lease(batch_id: str) -> str:
    return f"{KEY}lease:{batch_id}"


def nobatch(base_url: str) -> str:
    return f"{KEY}nobatch:{base_url}"
