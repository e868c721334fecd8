"""Exception types: programming errors surface at build time, everything else becomes a FAIL result."""


class TasktreeError(Exception):
    """Base class of every error tasktree_dist raises on purpose."""


class TasktreeProgrammingError(TasktreeError):
    """A tree was built or used in a way that can never work (wrong child count, bad parameter...).

    Raised while building, so mistakes show up before a run starts, with the node and its path in the message.
    """
