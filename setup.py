"""vdm_tf: likelihood-based diffusion models in TensorFlow / Keras.

Direct dependencies are pinned here; `constraints.txt` pins the whole resolved set so that
`make demo` / `make test` install the same versions everywhere.
"""

from setuptools import find_packages, setup

setup(
    name="vdm_tf",
    version="0.1.0",
    description="Variational Diffusion Models and friends in TensorFlow / Keras: state-of-the-art likelihoods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vdm_tf", "vdm_tf.*", "trainers", "trainers.*", "export", "export.*"]),
    include_package_data=True,
    # The bundled models of `python -m vdm_tf.compression` (photos.keras: the photos preset).
    package_data={"vdm_tf.models": ["*.keras"]},
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorflow-probability==0.25.0",
        # TensorFlow Probability refuses to import without tf-keras, even though vdm_tf uses Keras 3.
        "tf-keras==2.21.0",
        "tensorflow-datasets==4.9.10",
        # tensorflow-datasets imports it to prepare (download) any data set, e.g. cifar10, but declares it
        # only for Python < 3.9 (tensorflow/datasets#11212): without it, "No module named 'importlib_resources'".
        "importlib_resources==7.1.0",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "scikit-learn==1.9.1",
        # vdm_tf.datasets' photos: the photographs bundled with scikit-image (the default RGB model's data).
        "scikit-image==0.26.0",
        "pillow==13.0.0",
        "matplotlib==3.11.2",
        "tensorboard==2.21.0",
        # export/: TF-Serving's PredictionService protos and the gRPC client.
        "tensorflow-serving-api==2.21.0",
        "grpcio==1.85.3",
        # vdm_tf.compression: the ANS entropy coder of bits-back coding.
        "constriction==0.5.0",
        # vdm_tf.convert: reads the official VDM checkpoints (flax's msgpack files) without JAX.
        "msgpack==1.2.4",
    ],
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6"]},
)
