"""The simulator: the server's own scheduling code (router state, engine core, hand-over state
machines) on a virtual clock, with a latency model in place of the forward pass."""
