"""ament_python package of the REF-VLM node; `pip install -e` works as well as colcon."""
from setuptools import setup

PACKAGE = "refvlm_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    package_data={PACKAGE: ["*.xml"]},  # the Fast DDS profile (transport.py)
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ],
    install_requires=["setuptools", "numpy"],
    zip_safe=True,
    description="REF-VLM perception node for ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "refvlm_node = refvlm_ros.node:main",
            "refvlm_sim = refvlm_ros.sim_node:main",
        ],
    },
)
