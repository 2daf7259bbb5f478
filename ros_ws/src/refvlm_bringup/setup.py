"""ament_python package of the REF-VLM bringup: launch files, graph and parameters.

`launch` here links to the repository's launch/ folder (the design card's place for them),
so `colcon build` installs the same files `make setup` registers."""
from glob import glob

from setuptools import setup

PACKAGE = "refvlm_bringup"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py") + glob("launch/*.yaml")),
        (f"share/{PACKAGE}/launch/params", glob("launch/params/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    description="Launch files, graph and parameters of the REF-VLM perception node",
    license="Apache-2.0",
)
