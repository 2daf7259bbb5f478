"""ament_python entry point; metadata and dependencies are in setup.cfg.

The folders keep the names of the design card (training/, export/), but they import
under unambiguous names: ``import export`` would collide with everything.
"""
from setuptools import find_packages, setup

IMPORT_NAME_TO_FOLDER = {
    "refvlm_core": "refvlm_core",
    "refvlm_simworld": "simworld",
    "refvlm_training": "training",
    "refvlm_export": "export",
    "refvlm_cli": "refvlm_cli",
    "refvlm_mcp": "refvlm_mcp",
}

packages = []
for import_name, folder in IMPORT_NAME_TO_FOLDER.items():
    packages.append(import_name)
    packages += [f"{import_name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=IMPORT_NAME_TO_FOLDER,
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/refvlm"]),
        ("share/refvlm", ["package.xml"]),
        # launch/ is installed by the refvlm_bringup package (ros_ws/src/refvlm_bringup)
    ],
)
