"""bayespose: Bayesian and learned particle-pose estimation for cryo-EM, as a Scipion plugin and a CLI."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "bayespose" / "__init__.py").read_text()).group(1)

setup(
    name="scipion-em-bayespose",
    version=VERSION,
    description="Bayesian (MMSE) and learned particle-pose estimation for single-particle cryo-EM",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="GPLv3",
    python_requires=">=3.10",
    packages=find_packages(include=["bayespose", "bayespose.*"]),
    include_package_data=True,
    package_data={"bayespose": ["protocols.conf", "*.png", "data/*"]},
    install_requires=[
        line.strip()
        for line in (HERE / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ],
    entry_points={
        "pyworkflow.plugin": ["bayespose = bayespose"],
        "console_scripts": ["bayespose = bayespose.cli:main"],
    },
)
