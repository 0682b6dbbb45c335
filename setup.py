"""Install `mip_dist` and the top-level `kernels/` folder as `mip_dist.kernels`."""
from setuptools import find_packages, setup

setup(
    name="mip-dist",
    version="0.1.0",
    description="Distributed training of MIP (modality- and instance-aware visual prompts) for VI-ReID",
    python_requires=">=3.10",
    packages=find_packages(include=["mip_dist", "mip_dist.*"]) + ["mip_dist.kernels"],
    package_dir={"mip_dist.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "timm>=1.0,<2",
        "deepspeed>=0.15,<1",
        "triton>=3.4,<4; platform_system == 'Linux'",  # triton.knobs (first in 3.4; torch 2.14 brings 3.8)
        "webdataset>=0.2.90,<2",
        "accelerate>=0.34,<2",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scikit-learn>=1.3",
    ],
    extras_require={
        # launch/search.py (FAISS index; torch.topk without it) and launch/export_onnx.py (checked by onnxruntime)
        "deploy": ["faiss-cpu>=1.8", "onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "faiss-cpu>=1.8", "onnx>=1.16", "onnxscript>=0.1",
                "onnxruntime>=1.18"],
    },
)
