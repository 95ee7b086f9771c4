#!/usr/bin/env bash
# One HUMEA run, with the official positional arguments:
#
#   bash run.sh <seed> <dataset> <rate> <fusion_weight_dim> <without> [train_ill_path] [--flag value ...]
#   bash run.sh                      # no arguments: the embedded synthetic default
#
# <dataset>  FB15K_DB15K | FB15K_YAGO15K (folders under $DATA_ROOT, default data/mmkb-datasets),
#            "default" for the embedded synthetic pair, or a path to any folder in the standard layout.
# <without>  the official integer code, translated to a name here and only here:
#            0 nothing, 1 image, 2 graph, 3 rel_bow, 4 rel_text, 5 attr_bow, 6 attr_text,
#            7 cl (unimodal contrastive losses), 8 al (distillation); names (e.g. club, hmoe,
#            "image,club") are passed through unchanged.
# Anything from the first argument starting with "--" on is passed to train.py as it is, e.g.
#   bash run.sh 42 FB15K_DB15K 0.2 512 0 --preset official    # the official code's variant
# The official loss-weight environment variables AL_LOSS, CL_LOSS, TAU_AL, TAU_CL are honoured.
set -euo pipefail
cd "$(dirname "$0")"

positional=()
while [ $# -gt 0 ] && [[ "$1" != --* ]]; do positional+=("$1"); shift; done
extra=("$@")

without_name() {
  case "$1" in
    0|"") echo "" ;;
    1) echo image ;; 2) echo graph ;; 3) echo rel_bow ;; 4) echo rel_text ;;
    5) echo attr_bow ;; 6) echo attr_text ;; 7) echo cl ;; 8) echo al ;;
    [0-9]*) echo "run.sh: unknown <without> code '$1' (0-8, or a name)" >&2; return 1 ;;
    *) echo "$1" ;;
  esac
}

if [ ${#positional[@]} -eq 0 ]; then
  # The embedded default: a small synthetic KG pair generated once into data/embedded_default.
  exec python train.py --epochs "${EPOCHS:-100}" --check_point "${CHECK_POINT:-10}" "${extra[@]}"
fi
if [ ${#positional[@]} -lt 5 ] || [ ${#positional[@]} -gt 6 ]; then
  echo "usage: bash run.sh <seed> <dataset> <rate> <fusion_weight_dim> <without> [train_ill_path] [--flag value ...]" >&2
  echo "       bash run.sh            (embedded synthetic default)" >&2
  exit 2
fi
seed=${positional[0]}; dataset=${positional[1]}; rate=${positional[2]}; fwd=${positional[3]}
without=$(without_name "${positional[4]}")
ill=${positional[5]:-}

data_root="${DATA_ROOT:-data/mmkb-datasets}"
case "$dataset" in
  default|embedded) file_dir="" ;;
  */*) file_dir="$dataset" ;;
  *) file_dir="$data_root/$dataset" ;;
esac
if [ -n "$file_dir" ] && [ ! -d "$file_dir" ]; then
  case "$dataset" in
    FB15K_DB15K|FB15K_YAGO15K)
      echo "run.sh: dataset folder '$file_dir' does not exist; build it from the raw MMKB files:" >&2
      echo "  python -m data_process.build_mmkb --mmkb <mmkb root> --dataset $dataset --out $data_root" >&2 ;;
    */*) echo "run.sh: dataset folder '$file_dir' does not exist." >&2 ;;
    *) echo "run.sh: unknown dataset '$dataset' (no folder $file_dir)." >&2 ;;
  esac
  echo "  <dataset> is one of: FB15K_DB15K, FB15K_YAGO15K (folders under $data_root), default (the embedded" \
       "synthetic pair), or a path to a folder in the standard layout (containing a '/', e.g. ./my_kgs)" >&2
  exit 2
fi

args=(--seed "$seed" --rate "$rate" --fusion_weight_dim "$fwd"
      --epochs 1000 --check_point 10 --hidden_units 300,300,300 --heads 2,2 --lr 5e-4 --n_exp 5
      --bsize 512 --csls --csls_k 3
      --tau_cl "${TAU_CL:-0.1}" --tau_al "${TAU_AL:-4.0}" --cl_loss "${CL_LOSS:-1.0}" --al_loss "${AL_LOSS:-0.1}"
      --mi_loss 1e-4)
[ -n "$file_dir" ] && args+=(--file_dir "$file_dir")
[ -n "$without" ] && args+=(--without "$without")
[ -n "$ill" ] && args+=(--train_ill_path "$ill")
exec python train.py "${args[@]}" "${extra[@]}"
