"""The run folder's layout has one owner (delrec.core.layout): no other module of src/ joins the
run folder's directory and file names by hand, and the layout puts each step where the docs say."""

import re
from pathlib import Path

from delrec.core.layout import SNAPSHOTS, RunLayout

SRC = Path(__file__).resolve().parents[1] / "src" / "delrec"
# a path joined by hand from one of the run folder's own names
BY_HAND = re.compile(r'/ ["\'](teachers|distill|finetune|eval|data|shared|snapshots|figures)["\']'
                     r'|["\'](report\.md|pipeline\.json|curves\.json|config\.yaml)["\']')


def test_no_module_but_the_layout_joins_run_folder_names():
    found = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py")) if path.name != "layout.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if BY_HAND.search(line)]
    assert not found, "join these through delrec.core.layout.RunLayout:\n" + "\n".join(found)


def test_the_pattern_catches_a_join_by_hand():
    assert BY_HAND.search('run / "finetune" / name') and BY_HAND.search('open(run / "report.md")')
    assert BY_HAND.search("f\"{run / 'data'} was prepared\"")
    assert not BY_HAND.search('RunLayout(run).stage2(name)')


def test_each_step_has_its_folder(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.data == tmp_path / "data"
    assert layout.teacher("sasrec") == tmp_path / "teachers" / "sasrec"
    assert layout.soft_prompt("sasrec") == tmp_path / "distill" / "sasrec" / "soft_prompt.safetensors"
    assert layout.stage2("sasrec-delrec") == tmp_path / "finetune" / "sasrec-delrec"
    assert layout.stage2("sasrec-delrec") / SNAPSHOTS / layout.snapshot_name(40) == \
        tmp_path / "finetune" / "sasrec-delrec" / "snapshots" / "examples-000040"
    assert layout.pipeline_eval("popularity") == tmp_path / "eval" / "pipeline" / "popularity.json"
    assert layout.cli_eval("summary", "test") == tmp_path / "eval" / "summary.test.json"
    assert layout.shared("seed-0").teachers == tmp_path / "shared" / "seed-0" / "teachers"
    assert {p.name for p in layout.results} == {"teachers", "distill", "finetune", "eval"}
