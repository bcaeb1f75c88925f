"README.md mirrors nbs/index.ipynb (quarto renders it on GitHub; it cannot run here), and CI runs its test command."
import json, re, subprocess, sys
from pathlib import Path

root = Path(__file__).parent.parent


def test_readme_mirrors_index():
    readme = root.joinpath('README.md').read_text()
    cells = json.loads(root.joinpath('nbs/index.ipynb').read_text())['cells']
    for c in cells:
        if c['cell_type'] != 'markdown': continue
        for para in re.split(r'\n\s*\n', ''.join(c['source'])):
            if para.startswith('> ') or para.startswith('# '): continue  # title block
            assert para.strip() in readme, para


def test_readme_commands_main_job_first_and_ci_runs_the_test_one():
    readme = root.joinpath('README.md').read_text()
    cmds = re.findall(r'```sh\n(.*?)\n```', readme, re.S)
    assert len(cmds) == 3 and all(c.startswith('python3 -m venv .venv && ') for c in cmds)
    assert 'fastai-order-compare' in cmds[0] and '--data mnist' in cmds[0] and '--data imagenette-160' in cmds[1]
    assert 'pytest' in cmds[2] and 'nbdev-test' in cmds[2]
    assert "grep -m1 -E '^python3 -m venv \\.venv .*pytest' README.md" in root.joinpath('.ci/run').read_text()


def test_readme_python_snippets_run_as_pasted(tmp_path):
    "Every ```python block of the README, pasted in order into a fresh interpreter, runs (in a scratch folder: they write one)"
    blocks = re.findall(r'```python\n(.*?)```', root.joinpath('README.md').read_text(), re.S)
    assert len(blocks) >= 5 and blocks[0].startswith('from fastai_order.all import *')
    r = subprocess.run([sys.executable, '-c', '\n'.join(blocks)], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
