#!/usr/bin/env bash
# GPU check for issue 7 (images, bf16, torch.compile, data parallelism), for one CUDA GPU, ~150 s.
# Run from the repository root:  bash scripts/gpu-check-images.sh   (logs under $OUT if set)
# Needs torch with CUDA, numpy, pydantic, typer, rich, safetensors, torchdiffeq, matplotlib,
# scikit-learn; flowspec itself comes from this checkout (PYTHONPATH=.), its entry points from a
# generated dist-info (no pip install needed).
#   1. the CIFAR-10 LSD and PSD-M specs' first steps on CUDA in bf16 (random CIFAR-format data
#      unless data/cifar-10-batches-bin exists), compile off;
#   2. the bf16-autocast jvp against a float32 jvp on the spec's U-Net (attention at 16 x 16):
#      relative max error <= 1e-4 (TF32 off so that float32 is float32);
#   3. 2-process data-parallel steps: flowspec run --nproc 2 (both ranks on the one GPU, gloo): DDP,
#      DDP with train.grad_accum = 2, and FSDP2 (steps_per_sec in the summary, against step 1's run);
#   4. the LSD spec's first steps with torch.compile on (last: compiling takes the longest).
# Each check has its own timeout; a failing check is reported and the others still run.
# DEVICE=cpu SMOKE=1 bash scripts/gpu-check-images.sh: a dry run of this script without a GPU (a small
# U-Net, a few steps, bf16 autocast on the CPU; compile needs a C++ compiler), a few minutes on 2 cores.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-check-images}"
mkdir -p "$OUT"
LOG="$OUT/summary.txt"
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
FAILED=0
check() {  # check NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, record pass/fail, go on
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    say "PASS $name ($((SECONDS - start)) s)"
  else
    say "FAIL $name (exit $?, $((SECONDS - start)) s): last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | tee -a "$LOG"
    FAILED=1
  fi
}

# flowspec's entry points (its built-in components register through them) without installing it
META="$OUT/meta"
python - "$META" <<'PY'
import sys, tomllib, pathlib, importlib.metadata
try:
    importlib.metadata.distribution("flowspec")
    sys.exit(0)  # installed already: its entry points are there (a second copy would be a conflict)
except importlib.metadata.PackageNotFoundError:
    pass
root = pathlib.Path(sys.argv[1]); project = tomllib.load(open("pyproject.toml", "rb"))["project"]
info = root / f"flowspec-{project['version']}.dist-info"; info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flowspec\nVersion: {project['version']}\n")
lines = []
for group, eps in project["entry-points"].items():
    if group.startswith("flowspec."):
        lines += [f"[{group}]"] + [f"{k} = {v}" for k, v in eps.items()] + [""]
(info / "entry_points.txt").write_text("\n".join(lines))
PY
export PYTHONPATH="$PWD:$META${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$LOG"

# CIFAR-10 files: the real ones if present, else 640 random images in the binary-batch format
CIFAR=data
if [ ! -f data/cifar-10-batches-bin/data_batch_1.bin ] && [ ! -f data/data_batch_1.bin ]; then
  CIFAR=/tmp/fake-cifar
  python - "$CIFAR" <<'PY'
import sys, numpy as np, pathlib
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    recs = np.concatenate([rng.integers(0, 10, (128, 1)), rng.integers(0, 256, (128, 3072))], 1)
    recs.astype(np.uint8).tofile(d / name)
PY
  say "data: random CIFAR-format batches in $CIFAR (no data/cifar-10-batches-bin)"
fi
COMMON=(--set "data.root=\"$CIFAR\"" --set 'eval.metrics=[]' --set 'eval.metric_options={}'
        --set eval.num_samples=64 --set 'eval.steps=[1,2]' --set train.checkpoint_every=0
        --set train.log_every=5 --set "train.device=\"$DEVICE\"" --force)
# batch sizes of the checks: LSD / PSD-M / compile, the 2-process run's (split over the ranks), the jvp check's
B=128; B2=64; JB=16; STEPS=(20 10 6 10); NET=()
if [ "$SMOKE" = 1 ]; then  # a small U-Net with the same layer types, attention included
  NET=(network.channels=16 'network.channel_mult=[1,2]' network.num_blocks=1
       'network.attention_resolutions=[16]' network.channels_per_head=8)
  for item in "${NET[@]}"; do COMMON+=(--set "$item"); done
  B=8; B2=8; JB=4; STEPS=(3 2 2 2)
fi

cat > "$OUT/jvp_check.py" <<'PY'
"""bf16-autocast jvp (flowspec.jvp: autocast off, attention written out) vs a float32 jvp on the CIFAR U-Net."""
import os, sys
import torch
from flowspec.flowmap import FlowMap
from flowspec.jvp import jvp
from flowspec.networks.unet import UNet
from flowspec.spec import load_spec

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
spec = load_spec("specs/cifar10-lsd.toml", overrides=sys.argv[1:])
torch.manual_seed(0)
net = UNet(UNet.Options(**spec.network.model_dump(exclude={"kind"})), (3, 32, 32))
with torch.no_grad():  # away from the zero-initialized gains, so the map is not the identity
    net.out_gain.fill_(1.0)
    for m in net.modules():
        if hasattr(m, "emb_gain"):
            m.emb_gain.fill_(0.5)
device = os.environ.get("DEVICE", "cuda")
fm = FlowMap(net, scale=net.scale).to(device).eval()
g = torch.Generator(device).manual_seed(0)
n = int(os.environ.get("JVP_BATCH", "16"))
x = torch.randn(n, 3, 32, 32, device=device, generator=g) * 0.5
s = torch.rand(n, device=device, generator=g) * 0.5
t = s + 0.4
f = lambda tt: fm(s, tt, x)
ones = torch.ones_like(t)
X32, d32 = jvp(f, (t,), (ones,))
with torch.autocast(device, dtype=torch.bfloat16):
    X16, d16 = jvp(f, (t,), (ones,))
    fwd16 = f(t)
    try:
        _, naive = torch.func.jvp(f, (t,), (ones,))
        naive_err = ((naive.float() - d32).abs().max() / d32.abs().max()).item()
    except Exception as exc:  # e.g. no forward-AD rule for the flash attention kernel
        naive_err = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
err = ((d16 - d32).abs().max() / d32.abs().max()).item()
err_X = ((X16 - X32).abs().max() / X32.abs().max()).item()
print(f"guarded bf16-autocast jvp vs float32: rel. max error dX/dt {err:.3g}, X {err_X:.3g} (tolerance 1e-4)")
print(f"bf16 forward pass vs float32: rel. max error {((fwd16.float() - X32).abs().max() / X32.abs().max()).item():.3g}")
print(f"unguarded torch.func.jvp under autocast: {naive_err}")
assert d16.dtype == torch.float32 and err <= 1e-4 and err_X <= 1e-4, "jvp under autocast is not float32"
PY

check lsd-bf16 90 python -m flowspec run specs/cifar10-lsd.toml "${COMMON[@]}" \
  --set train.steps=${STEPS[0]} --set train.batch_size=$B --set train.compile=false --out "$OUT/run-lsd-bf16"
check psd-m-bf16 90 python -m flowspec run specs/cifar10-psd-m.toml "${COMMON[@]}" \
  --set train.steps=${STEPS[1]} --set train.batch_size=$B --set train.compile=false --out "$OUT/run-psdm-bf16"
check jvp-bf16-vs-fp32 90 env DEVICE="$DEVICE" JVP_BATCH=$JB python "$OUT/jvp_check.py" "${NET[@]}"
check ddp-2proc 150 python -m flowspec run specs/cifar10-lsd.toml "${COMMON[@]}" --nproc 2 \
  --set train.steps=${STEPS[2]} --set train.batch_size=$B2 --set train.compile=false --set train.checkpoint_every=3 \
  --out "$OUT/run-ddp"
# issue 16: gradient accumulation under DDP, and FSDP2 (sharded U-Net) on the same two ranks
check ddp-accum-2proc 150 python -m flowspec run specs/cifar10-lsd.toml "${COMMON[@]}" --nproc 2 \
  --set train.steps=${STEPS[2]} --set train.batch_size=$B2 --set train.compile=false --set train.grad_accum=2 \
  --out "$OUT/run-ddp-accum"
check fsdp-2proc 150 python -m flowspec run specs/cifar10-lsd.toml "${COMMON[@]}" --nproc 2 \
  --set train.steps=${STEPS[2]} --set train.batch_size=$B2 --set train.compile=false \
  --set 'train.parallel="fsdp"' --out "$OUT/run-fsdp"
# last, as the slowest (inductor compiles the U-Net's forward and backward: a minute or two)
check lsd-bf16-compile 240 python -m flowspec run specs/cifar10-lsd.toml "${COMMON[@]}" \
  --set train.steps=${STEPS[3]} --set train.batch_size=$B --set train.compile=true --out "$OUT/run-lsd-compile"


if [ -f "$OUT/run-ddp/metrics.jsonl" ]; then
  say "ddp metrics.jsonl: $(wc -l < "$OUT/run-ddp/metrics.jsonl") lines; world_size $(python -c "import json; print(json.load(open('$OUT/run-ddp/environment.json')).get('world_size'))")"
fi
for run in run-lsd-bf16 run-psdm-bf16 run-ddp run-ddp-accum run-fsdp run-lsd-compile; do
  if [ -f "$OUT/$run/metrics.jsonl" ]; then
    say "$run: $(grep -v '"eval"' "$OUT/$run/metrics.jsonl" | tail -n 1 | cut -c1-220)"
  fi
done
rm -rf "$OUT"/run-*/checkpoints "$OUT/meta"  # keep the logs small
say "done: $([ $FAILED = 0 ] && echo all passed || echo some failed)"
exit $FAILED
