"""What only the Raft leader does: the engine (leadership life cycle and sources), the runner
that executes the decider's steps, promotions, the wait for every proxy, and failover traces."""
