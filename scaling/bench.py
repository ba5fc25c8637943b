"""``scaling bench KIND``: speed figures. Each kind lives beside the code it measures and
exposes ``add_arguments(parser, kind)`` and either ``measure(args) -> dict`` with
``report(out)`` (this module prints the dict for ``--json``, else calls ``report``) or its own
``run(args) -> int``."""

from __future__ import annotations

import importlib
import json


def _run(mod, args) -> int:
    if not hasattr(mod, "report"):
        return mod.run(args)
    out = mod.measure(args)
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
    else:
        mod.report(out)
    return 0

KINDS = {
    "train": "scaling.train.bench",
    "hparams": "scaling.train.bench_hparams",
    "stack": "scaling.train.bench_stack",
    "moe": "scaling.models.bench",
    "mod": "scaling.models.bench",
    "fit": "scaling.fit.bench",
    "sweep": "scaling.sweep.bench",
    "data": "scaling.data.bench",
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
        kp.set_defaults(func=lambda args, _m=mod: _run(_m, args))
