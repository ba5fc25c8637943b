"""``scaling bench KIND``: speed figures. Each kind lives beside the code it measures and
exposes ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import importlib

KINDS = {
    "train": "scaling.train.bench",
    "moe": "scaling.models.bench",
    "mod": "scaling.models.bench",
    "fit": "scaling.fit.bench",
    "sweep": "scaling.sweep.bench",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks: tok/s, MFU, compile s, fit s")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    for kind, module in KINDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith(module):
                continue
            raise
        kp = kinds.add_parser(kind, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else kind)
        kp.add_argument("--json", action="store_true", help="print one JSON object")
        mod.add_arguments(kp, kind)
        kp.set_defaults(func=lambda args, _m=mod: _m.run(args))
