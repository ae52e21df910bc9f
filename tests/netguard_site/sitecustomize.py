"""The tests' socket guard in every Python process they start (the trainer CLIs, the ComfyUI server):
``tests/conftest.py`` puts this folder on ``PYTHONPATH`` and names a log file in
``LONGALIGN_NETWORK_GUARD_LOG``; each refused attempt is appended there, and the test running at
the time fails (``tests/network_guard.py``). Outside the tests the variable is unset: nothing happens."""
import importlib.util
import os

if os.environ.get("LONGALIGN_NETWORK_GUARD_LOG"):
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "network_guard.py")
    _spec = importlib.util.spec_from_file_location("longalign_network_guard", _path)
    _guard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.install(os.environ["LONGALIGN_NETWORK_GUARD_LOG"])
