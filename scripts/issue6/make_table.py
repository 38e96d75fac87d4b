"""Evidence for issue 6: the acquisition / forgetting table from a notebook-07 run's records.json.

Usage: python scripts/issue6/make_table.py reports/cpu/07_continual_learning_forgetting/records.json
Writes reports/issue6/table_<profile>.json and prints the table.
"""

import json
import sys
from pathlib import Path

from permkv.experiments.continual_learning import matched_comparison

src = Path(sys.argv[1])
records = json.loads(src.read_text())
profile = src.parent.parent.name
metrics = {}
matched = matched_comparison(records)
cols = ("method", "lr", "t", "step", "fact_em", "squad_f1", "forget_squad_f1", "world_acc", "forget_world_acc",
        "essay_ppl", "forget_essay_ppl", "train_seconds")
rows = [{k: r[k] for k in cols} for r in records]
out = {"source": str(src), "profile": profile, "target_em": matched["target_em"],
       "matched": {m: {k: matched[m][k] for k in cols} for m in ("sparse", "full", "lora")},
       "all_checkpoints": rows, "metrics": metrics}
(Path("reports/issue6") / f"table_{profile}.json").write_text(json.dumps(out, indent=1))
print(f"matched fact EM target {matched['target_em']:.3f}")
print(f"{'method':7} {'lr':>7} {'t':>5} {'step':>4} {'EM':>6} {'SQuAD F1':>8} {'drop':>7} {'world':>6} {'drop':>7} {'ppl':>7} {'rise':>7}")
for r in rows:
    mark = " <- matched" if any(r == {k: matched[m][k] for k in cols} for m in ("sparse", "full", "lora")) else ""
    print(f"{r['method']:7} {r['lr']:7.0e} {str(r['t']):>5} {r['step']:4d} {r['fact_em']:6.3f} {r['squad_f1']:8.3f} "
          f"{r['forget_squad_f1']:7.1%} {r['world_acc']:6.3f} {r['forget_world_acc']:7.1%} {r['essay_ppl']:7.2f} "
          f"{r['forget_essay_ppl']:7.1%}{mark}")
