"""`python -m lmx_worker --spec JSON`: run one model worker."""

from __future__ import annotations

import argparse
import sys

from lmx_worker.process.main import configure_logging, serve
from lmx_worker.process.spec import decode_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmx_worker")
    parser.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    args = parser.parse_args(argv)
    configure_logging()
    spec = decode_spec(args.spec)
    if spec.shard is not None and spec.shard.rank > 0:
        # As rank 0 (load_engine): OpenBLAS and the host's kernel JIT before
        # MLX loads, which importing the follower does. Without it this rank
        # computed with MLX's bundled reference BLAS, and a group's 8-stream
        # steps ran 5x slower than the whole model's (sharded_bench).
        from lmx_worker.engines.loader import prepare_mlx

        prepare_mlx(spec)
        from lmx_worker.sharding.follower import serve_follower

        return serve_follower(spec)
    return serve(spec)


if __name__ == "__main__":
    sys.exit(main())
