"""Who leads each shard: the coordination contract (:mod:`.api`), the ``static`` coordination
of the core (:mod:`.static`) and what a node does when leadership moves (:mod:`.roles`)."""
