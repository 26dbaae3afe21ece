"""One MLX model tensor-parallel across the ranks of a group (issue 16).

The ranks join MLX's `ring` backend (mx.distributed over TCP; `ring`),
split every layer's attention heads and MLP columns between them
(`tensor_parallel`), and run the SAME engine steps: rank 0 is a normal
worker (the supervisor's DEALER) that decides each step and broadcasts
the decision (`orders`, `leader`); the other ranks only follow it
(`follower`). Any disagreement between ranks would make their collective
ops wait on each other forever, so nothing a follower does depends on its
own clock, memory or random numbers.
"""
