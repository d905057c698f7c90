"""What `pip install .` gives: one package, `ravlt` (the models/ folder), and no generic top-level name (no
`datasets`, `utils`, `models`, `main` ... to shadow other packages); importing it registers RAVLT with timm."""

import os
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # builds a wheel


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp('wheel')
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '--quiet',
            '--no-deps',
            '--no-build-isolation',
            '--wheel-dir',
            str(folder),
            ROOT,
        ],
        check=True,
        cwd=folder,
        capture_output=True,
    )
    (path,) = folder.glob('ravlt-*.whl')
    return path


def test_the_wheel_holds_one_package_named_ravlt(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split('/')[0] for name in names}
    assert {t for t in top_level if not t.endswith('.dist-info')} == {'ravlt'}
    assert {'ravlt/__init__.py', 'ravlt/ravlt.py', 'ravlt/dense.py', 'ravlt/reference.py'} <= set(names)
    assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names)


def test_importing_the_installed_package_registers_the_models(wheel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # not this clone's folders
    env.update(PYTHONPATH=str(wheel), OMP_NUM_THREADS='1')
    code = (
        'import timm, torch, ravlt; m = timm.create_model("ravlt_t", depths=(1, 1, 1, 1)).eval(); '
        'print(ravlt.__file__.startswith(sys.argv[1]), tuple(m(torch.zeros(1, 3, 64, 64)).shape))'
    )
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; ' + code, str(wheel)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', '(1,', '1000)']
