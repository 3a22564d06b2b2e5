"""Replication: the transport contract, the leader log and the follower loop."""
