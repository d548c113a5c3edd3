"""What `streamtrain convert` pays before it reads a byte: its process start imports neither torch, nor
pandas, nor pyarrow.compute (needed only to verify a dataset), each a tenth of a second or more."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_convert_command_start_imports_no_heavy_module():
    code = ("import sys\nimport streamtrain.cli, streamtrain.convert\nstreamtrain.cli.build_parser()\n"
            "print(sorted(m for m in ('torch', 'pandas', 'pyarrow.compute') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
