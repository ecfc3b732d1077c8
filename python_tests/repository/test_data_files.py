"""Data that is not the project's stays out of the repository: the HyCAM authors' Auto-CoT.json
lives beside the checkout (../shared/data/, README "Data files"), never inside it."""
import subprocess

from python_tests.helpers import AUTO_COT, ROOT, needs_auto_cot, repository_files


def test_auto_cot_is_not_in_the_repository():
    copies = [f for f in repository_files() if "auto-cot" in f.lower()]
    assert not copies, (f"{copies}: the HyCAM authors' Auto-CoT data must not be added to the "
                        f"repository; the tests read it from {AUTO_COT}")
    ignore = subprocess.run(["git", "check-ignore", "-q", "Auto-CoT.json"], cwd=str(ROOT))
    assert ignore.returncode == 0, ".gitignore should list Auto-CoT.json"


def test_auto_cot_skip_reason_says_where_and_why():
    mark = needs_auto_cot.mark
    reason = mark.kwargs["reason"]
    assert "../shared/data/" in reason and "not part of the repository" in reason
    assert str(AUTO_COT) in reason


@needs_auto_cot
def test_auto_cot_is_the_authors_alpaca_file():
    from hycam_ext.finetune import load_alpaca_file
    records = load_alpaca_file(str(AUTO_COT))
    assert len(records) > 1000
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
