"""The README's Layout section is the map of the package: it names every subpackage and module, and links every docs page."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout"):]


def test_the_layout_names_every_subpackage_and_module():
    layout = layout_section()
    for package in sorted(p for p in (ROOT / "convtool").iterdir() if (p / "__init__.py").exists()):
        assert f"convtool/{package.name}/" in layout, package.name
        for module in sorted(package.glob("*.py")):
            if module.name != "__init__.py":
                assert re.search(rf"\b{re.escape(module.name)}\b", layout), f"{package.name}/{module.name}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name


def test_the_package_has_no_import_cycle_and_no_file_too_long_to_read():
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if tool.exists():  # the team's checker, beside the checkout
        result = subprocess.run([sys.executable, str(tool), "convtool"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    for path in (ROOT / "convtool").rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 500, path.relative_to(ROOT)
