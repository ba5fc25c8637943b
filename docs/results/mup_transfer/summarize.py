"""Summarise the LR-transfer sweep: best LR per width and parametrization, the loss table, and
the checks registered in prediction.md. Usage: python docs/results/mup_transfer/summarize.py RUNS_DIR"""

import json
import math
import sys
from pathlib import Path

from scaling import runs

src = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mup_transfer")
df = runs.load(src)
done = df[df["state"] == "done"].copy()
grid = sorted(float(x) for x in done["lr"].unique())
widths = sorted(int(x) for x in done["d_model"].unique())
out = {"source": str(src), "n_done": int(len(done)), "n_trials": int(len(df)), "lr_grid": grid, "widths": widths, "arms": {}}
print(f"{len(done)} of {len(df)} trials done\n")
for arm in ("sp", "mup"):
    sub = done[done["variant"] == arm]
    table, best = {}, {}
    for w in widths:
        row = sub[sub["d_model"] == w].set_index("lr")["loss"].to_dict()
        table[int(w)] = {float(k): float(v) for k, v in row.items()}
        if row:
            lr_best = min(row, key=row.get)
            best[int(w)] = {"lr": float(lr_best), "grid_index": grid.index(lr_best), "loss": float(row[lr_best])}
    out["arms"][arm] = {"loss": table, "best": best}
    print(f"## {arm}: final held-out loss (nats/token) by width (rows) and lr (columns)\n")
    print("| width | " + " | ".join(f"2^{math.log2(x):.0f}" for x in grid) + " | best lr |")
    print("|---|" + "---|" * (len(grid) + 1))
    for w in widths:
        row = table.get(int(w), {})
        cells = []
        for x in grid:
            v = row.get(float(x))
            mark = "**" if best.get(int(w), {}).get("lr") == float(x) else ""
            cells.append(f"{mark}{v:.4f}{mark}" if v is not None else "-")
        b = best.get(int(w))
        print(f"| {int(w)} | " + " | ".join(cells) + (f" | {b['lr']:.4g} |" if b else " | - |"))
    print()
checks = {}
for arm in ("sp", "mup"):
    b = out["arms"][arm]["best"]
    if 64 in b and 512 in b:
        checks[f"{arm}_best_shift_64_to_512_grid_points"] = b[512]["grid_index"] - b[64]["grid_index"]
sp64, mu64 = out["arms"]["sp"]["loss"].get(64, {}), out["arms"]["mup"]["loss"].get(64, {})
common = sorted(set(sp64) & set(mu64))
if common:
    checks["width64_max_abs_diff_sp_vs_mup"] = float(max(abs(sp64[k] - mu64[k]) for k in common))
for arm in ("sp", "mup"):
    b = out["arms"][arm]["best"]
    if 512 in b:
        checks[f"{arm}_best_loss_512"] = b[512]["loss"]
out["checks"] = checks
print("checks:", json.dumps(checks, indent=1))
(Path(__file__).parent / "results.json").write_text(json.dumps(out, indent=1))
