#!/bin/sh
# What the KubeRay pods' read-only root filesystem allows, checked on this machine: a tiny
# `wsss run` (Ray Train, Ray Data, CRF, evaluation, gallery) in a private mount namespace whose
# root is remounted read-only, with only a fresh tmpfs at /tmp writable (the pods' emptyDir; the
# object store's /dev/shm stays as it is) and $HOME on the read-only root.
#   unshare -rm sh cluster/read_only_root_check.sh      (from the repository root, after make setup)
# Ends with "root is read-only" after the run's table when everything wrote where it may.
set -e
repo=$(pwd)
mount -t tmpfs tmpfs /tmp
mount -o remount,ro,bind /
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
files="--set output=/tmp/out --set log_dir=/tmp/wsss-logs --set synthetic.out=/tmp/data
  --set dataset.manifest=/tmp/data/manifest.jsonl --set synthetic.n=12 --set ray.local_cpus=4
  --set synthetic.params.min_side=48 --set synthetic.params.max_side=64"
tiny="--set classifier.optim.epochs=1 --set affinity.optim.epochs=1 --set cam.scales=[1.0]
  --set classifier.augment.crop_size=48 --set classifier.augment.resize_long=[48,64]
  --set affinity.augment.crop_size=48 --set affinity.augment.resize_long=[48,64]
  --set affinity.model.feature_stride=8 --set crf.iterations=2"
"$repo/.venv/bin/wsss" synth $files
"$repo/.venv/bin/wsss" run $files $tiny
if touch "$repo/.read-only-root-check" 2>/dev/null; then
    rm -f "$repo/.read-only-root-check"
    echo "the root is writable: the check did not run under a read-only root" >&2
    exit 1
fi
echo "root is read-only"
