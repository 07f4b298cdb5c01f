"""infercept_hf: INFERCEPT-style interception handling for HuggingFace transformers."""
from setuptools import find_namespace_packages, setup

setup(
    name="infercept_hf",
    version="0.1.0",
    description="Serve augmented (tool-calling) LLMs on transformers without recomputing paused contexts (INFERCEPT, ICML 2024)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # patches/ is a top-level folder of the repository but installs inside the package, as
    # infercept_hf.patches: a top-level `patches` package would collide with any other of that name.
    # Namespace discovery lists the asset folders as packages too, so their files ship as package
    # data without setuptools warning about data folders it cannot place.
    packages=[*find_namespace_packages(include=["infercept_hf*"], exclude=["*.__pycache__"]), "infercept_hf.patches"],
    package_dir={"infercept_hf.patches": "patches"},
    package_data={"infercept_hf.assets.demo_model": ["*"]},
    install_requires=[
        "torch>=2.4",
        # transformers internals we patch live in patches/; this is the range the test suite passes on.
        "transformers>=5.23,<5.24",
        "accelerate>=1.0",
        "safetensors",
        "tokenizers>=0.20",
        "tqdm",
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "demo": ["gradio>=6,<7", "matplotlib"],
        "bench": ["matplotlib"],
        "flash": ["flash-attn>=2.6"],
        "gguf": ["gguf>=0.10"],
        "test": ["pytest", "hypothesis", "matplotlib", "playwright", "gradio>=6,<7", "gradio_client", "gguf>=0.10",
                 "openai>=1.0"],
        "serve": ["fastapi", "uvicorn", "openai>=1.0"],
    },
    entry_points={"console_scripts": ["infercept-bench=infercept_hf.bench.__main__:main",
                                      "infercept-serve=infercept_hf.serve.cli:main"]},
)
