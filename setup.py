"""Install dpinfer: ``pip install -e .`` (``make install`` installs torch first)."""

from setuptools import find_packages, setup

setup(
    name="dpinfer",
    version="0.1.0",
    description="A data-parallel inference coordinator and serving stack for language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dpinfer", "dpinfer.*"]),
    package_data={"dpinfer.runner": ["paged_attention.c"]},
    install_requires=[
        "torch==2.13.0",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "huggingface_hub==2.4.0",
        "numpy==2.4.6",
        "pyzmq==27.3.0",
        "msgpack==1.2.4",
        "click==8.5.1",
        "rich==15.0.0",
        "pillow==13.0.0",
        "msgspec==0.23.0",
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "uvloop==0.23.0",
        "httptools==0.9.0",
        "prometheus-client==0.26.0",
    ],
    extras_require={
        "smollm2": ["accelerate==1.15.0", "gguf==0.19.0"],
        "dev": [
            "pytest==9.0.3",
            "pytest-timeout==2.4.0",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "import-linter==2.17",
            "openai==3.51.0",
            "httpx==0.28.1",
            "schemathesis==4.32.5",
        ],
    },
    entry_points={"console_scripts": ["dpinfer = dpinfer.cli:main"]},
)
