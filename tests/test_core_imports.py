"""imagen_core is the model library: it must import without Ray, DeepSpeed or MLflow."""
import subprocess
import sys

FORBIDDEN = ("ray", "deepspeed", "mlflow")


def test_imagen_core_imports_no_distributed_or_tracking_package():
    code = (
        "import sys, importlib, pkgutil, imagen_core\n"
        "for m in pkgutil.walk_packages(imagen_core.__path__, 'imagen_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imagen_core pulled in: {out.stdout.strip()}"
