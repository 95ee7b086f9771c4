#!/usr/bin/env bash
# The paper's experiments, one run.sh call per line of RUN_TABLE below, then the report.
#
#   bash run_all.sh                                  # every run not finished yet, then runs/results.md
#   bash run_all.sh --list                           # print the commands (and whether each is done)
#   bash run_all.sh --only table1,il                 # a subset: table1 table2 seeds valid il fig3, or names
#   bash run_all.sh --only fig3 --epochs 400         # Figure 3's sweep at 400 epochs a point (labelled so;
#                                                    # its default point is t1_db_20 at epoch 400)
#   bash run_all.sh --dataset-override default --out_dir runs/smoke --epochs 2 --check_point 1 \
#        --il_epochs 2 --il_step 1                   # smoke pass: every line on the embedded default
#
# Options (everything else is passed to every run, after the run's own flags, so it wins):
#   --list                   print the commands and exit
#   --only A,B               keep the lines whose table or run name is listed: table1 table2 seeds
#                            valid il fig3, or run names (Table 2's "Ours", Figure 3's default point and
#                            the seeds table's seed 42 are the table1 line t1_db_20)
#   --dataset-override D     run every line on dataset D ("default" = the embedded synthetic pair);
#                            env DATASET_OVERRIDE does the same
#   --out_dir DIR            parent of the run folders (default runs; env RUNS_DIR)
#   --preset P               paper (default) or official (every departure of the official code,
#                            train.py --preset); a non-paper preset's runs go to <out_dir>/<P>/, so
#                            both presets' Table 1 lines keep separate run folders
#   --report FILE            where the report goes (default <out_dir>/results.md, figures in
#                            <out_dir>/figures), rewritten after every finished run; --no-report skips it.
#                            Its notes come from FILE's neighbour <stem>_notes.md when there is one
#                            (docs/results_notes.md for --report docs/results.md)
#   --records DIR            keep each finished run's record (results and a slim metrics copy) in
#                            DIR/<name>.json, which the report reads once the run folder is gone
#                            (default docs/records, docs/records/official for --preset official, when
#                            --out_dir and the datasets are the defaults; otherwise none)
#   --jobs N                 runs at a time: N per GPU, or N on the CPU, each run then with
#                            OMP_NUM_THREADS=1 unless it is set (default 1)
#
# A run whose folder holds results.json is finished and skipped, and so is one whose folder is gone but
# whose record (--records) is kept, unless --only names it; one with checkpoint.pt but no
# results.json was interrupted and is resumed from its checkpoint (train.py --resume); an
# iterative line (--il) whose plain run (the same line without --il, e.g. t1_db_20 for il_db_20) is
# finished starts from that run's final checkpoint (train.py --il_from) and trains only the iterative
# epochs; Table 2's w/o v on a dataset without image features is not run (it is the full model, and
# the report shows t1_db_20 in its place); anything else starts from scratch. On CPU (or one GPU) the runs go one after the other unless --jobs says
# more; with several GPUs (nvidia-smi -L, or the list in CUDA_VISIBLE_DEVICES) --jobs runs per GPU go
# in parallel. Each run's output goes to <out_dir>/<name>/stdout.txt and its exact command to
# <out_dir>/<name>/command.txt.
set -uo pipefail
cd "$(dirname "$0")"
# The whole script is one brace group, read before it runs: editing this file while a long
# run_all.sh is under way cannot change what that one does.
{

# Columns: run name | table | row | paper Hits@1 | run.sh arguments
#   seed dataset rate fusion_weight_dim without [--flags]; <without> is the official code 0-8
#   (0 none, 1 image, 2 graph, 3 rel_bow, 4 rel_text, 5 attr_bow, 6 attr_text, 7 cl, 8 al) or a
#   name (club, hmoe); run.sh translates it. fusion_weight_dim: 512 for DB 20%, 128 for YG 20%, else
#   0 (official README). Paper Hits@1: Table 1 and 2 of the paper; "il" rows: the official
#   iterative logs (the paper prints no iterative numbers); "plot-only": Figure 3 has no printed
#   numbers. t1_db_20 is also Table 2's "Ours" row and the default point of every Figure 3 sweep
#   (al_loss 0.1, cl_loss 1.0, tau_cl 0.1, tau_al 4.0, n_exp 5), so those points are not repeated.
RUN_TABLE=$(cat <<'RUN_TABLE'
t1_db_20             | table1 | FB15K-DB15K 20%   | 0.5118    | 42 FB15K_DB15K 0.2 512 0
t1_db_50             | table1 | FB15K-DB15K 50%   | 0.6949    | 42 FB15K_DB15K 0.5 0 0
t1_db_80             | table1 | FB15K-DB15K 80%   | 0.8094    | 42 FB15K_DB15K 0.8 0 0
t1_yg_20             | table1 | FB15K-YAGO15K 20% | 0.4393    | 42 FB15K_YAGO15K 0.2 128 0
t1_yg_50             | table1 | FB15K-YAGO15K 50% | 0.6491    | 42 FB15K_YAGO15K 0.5 0 0
t1_yg_80             | table1 | FB15K-YAGO15K 80% | 0.7737    | 42 FB15K_YAGO15K 0.8 0 0
t1_db_20_s43         | seeds  | FB15K-DB15K 20%   | 0.5118    | 43 FB15K_DB15K 0.2 512 0
t1_db_20_s44         | seeds  | FB15K-DB15K 20%   | 0.5118    | 44 FB15K_DB15K 0.2 512 0
t1_db_20_val         | valid  | FB15K-DB15K 20%   | 0.5118    | 42 FB15K_DB15K 0.2 512 0 --val_ratio 0.1
t1_db_20_val_es      | valid  | FB15K-DB15K 20%   | 0.5118    | 42 FB15K_DB15K 0.2 512 0 --val_ratio 0.1 --early_stop 5
t1_yg_20_val_es      | valid  | FB15K-YAGO15K 20% | 0.4393    | 42 FB15K_YAGO15K 0.2 128 0 --val_ratio 0.1 --early_stop 5
t1_db_20_val_cal     | valid  | FB15K-DB15K 20%   | 0.5118    | 42 FB15K_DB15K 0.2 512 0 --val_ratio 0.1 --calibrate_weights
t1_yg_20_val_cal     | valid  | FB15K-YAGO15K 20% | 0.4393    | 42 FB15K_YAGO15K 0.2 128 0 --val_ratio 0.1 --calibrate_weights
t2_db_20_wo_g        | table2 | w/o g             | 0.4131    | 42 FB15K_DB15K 0.2 512 2
t2_db_20_wo_v        | table2 | w/o v             | 0.4803    | 42 FB15K_DB15K 0.2 512 1
t2_db_20_wo_r_b      | table2 | w/o r_b           | 0.4736    | 42 FB15K_DB15K 0.2 512 3
t2_db_20_wo_r_t      | table2 | w/o r_t           | 0.4841    | 42 FB15K_DB15K 0.2 512 4
t2_db_20_wo_a_b      | table2 | w/o a_b           | 0.4731    | 42 FB15K_DB15K 0.2 512 5
t2_db_20_wo_a_t      | table2 | w/o a_t           | 0.4844    | 42 FB15K_DB15K 0.2 512 6
t2_db_20_wo_cl       | table2 | w/o L_m^CL        | 0.4840    | 42 FB15K_DB15K 0.2 512 7
t2_db_20_wo_al       | table2 | w/o L_m^AL        | 0.4864    | 42 FB15K_DB15K 0.2 512 8
t2_db_20_wo_club     | table2 | w/o L_CLUB        | 0.5033    | 42 FB15K_DB15K 0.2 512 club
t2_db_20_wo_hmoe     | table2 | w/o HMoE          | 0.4778    | 42 FB15K_DB15K 0.2 512 hmoe
il_db_20             | il     | FB15K-DB15K 20%   | 0.679     | 42 FB15K_DB15K 0.2 512 0 --il
il_db_50             | il     | FB15K-DB15K 50%   | 0.740     | 42 FB15K_DB15K 0.5 0 0 --il
il_db_80             | il     | FB15K-DB15K 80%   | 0.836     | 42 FB15K_DB15K 0.8 0 0 --il
il_yg_20             | il     | FB15K-YAGO15K 20% | 0.606     | 42 FB15K_YAGO15K 0.2 128 0 --il
il_yg_50             | il     | FB15K-YAGO15K 50% | 0.698     | 42 FB15K_YAGO15K 0.5 0 0 --il
il_yg_80             | il     | FB15K-YAGO15K 80% | 0.779     | 42 FB15K_YAGO15K 0.8 0 0 --il
f3_al_loss_0.01      | fig3   | al_loss=0.01      | plot-only | 42 FB15K_DB15K 0.2 512 0 --al_loss 0.01
f3_al_loss_0.05      | fig3   | al_loss=0.05      | plot-only | 42 FB15K_DB15K 0.2 512 0 --al_loss 0.05
f3_al_loss_0.5       | fig3   | al_loss=0.5       | plot-only | 42 FB15K_DB15K 0.2 512 0 --al_loss 0.5
f3_al_loss_1.0       | fig3   | al_loss=1.0       | plot-only | 42 FB15K_DB15K 0.2 512 0 --al_loss 1.0
f3_cl_loss_0.01      | fig3   | cl_loss=0.01      | plot-only | 42 FB15K_DB15K 0.2 512 0 --cl_loss 0.01
f3_cl_loss_0.05      | fig3   | cl_loss=0.05      | plot-only | 42 FB15K_DB15K 0.2 512 0 --cl_loss 0.05
f3_cl_loss_0.1       | fig3   | cl_loss=0.1       | plot-only | 42 FB15K_DB15K 0.2 512 0 --cl_loss 0.1
f3_cl_loss_0.5       | fig3   | cl_loss=0.5       | plot-only | 42 FB15K_DB15K 0.2 512 0 --cl_loss 0.5
f3_tau_cl_0.01       | fig3   | tau_cl=0.01       | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_cl 0.01
f3_tau_cl_0.05       | fig3   | tau_cl=0.05       | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_cl 0.05
f3_tau_cl_0.5        | fig3   | tau_cl=0.5        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_cl 0.5
f3_tau_cl_1.0        | fig3   | tau_cl=1.0        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_cl 1.0
f3_tau_al_0.1        | fig3   | tau_al=0.1        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_al 0.1
f3_tau_al_0.5        | fig3   | tau_al=0.5        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_al 0.5
f3_tau_al_1.0        | fig3   | tau_al=1.0        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_al 1.0
f3_tau_al_2.0        | fig3   | tau_al=2.0        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_al 2.0
f3_tau_al_8.0        | fig3   | tau_al=8.0        | plot-only | 42 FB15K_DB15K 0.2 512 0 --tau_al 8.0
f3_n_exp_1           | fig3   | n_exp=1           | plot-only | 42 FB15K_DB15K 0.2 512 0 --n_exp 1
f3_n_exp_3           | fig3   | n_exp=3           | plot-only | 42 FB15K_DB15K 0.2 512 0 --n_exp 3
f3_n_exp_7           | fig3   | n_exp=7           | plot-only | 42 FB15K_DB15K 0.2 512 0 --n_exp 7
f3_n_exp_9           | fig3   | n_exp=9           | plot-only | 42 FB15K_DB15K 0.2 512 0 --n_exp 9
RUN_TABLE
)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

list_only=0; only=""; override="${DATASET_OVERRIDE:-}"; out_dir="${RUNS_DIR:-runs}"
report=""; do_report=1; extra=(); preset=paper; records=""; jobs=1; out_given=0
[ -n "${RUNS_DIR:-}" ] && out_given=1
while [ $# -gt 0 ]; do
  case "$1" in
    --list) list_only=1 ;;
    --only) only="${2:?--only needs a value}"; shift ;;
    --only=*) only="${1#*=}" ;;
    --dataset-override) override="${2:?--dataset-override needs a value}"; shift ;;
    --dataset-override=*) override="${1#*=}" ;;
    --out_dir) out_dir="${2:?--out_dir needs a value}"; out_given=1; shift ;;
    --out_dir=*) out_dir="${1#*=}"; out_given=1 ;;
    --preset) preset="${2:?--preset needs a value}"; shift ;;
    --preset=*) preset="${1#*=}" ;;
    --report) report="${2:?--report needs a value}"; shift ;;
    --no-report) do_report=0 ;;
    --records) records="${2:?--records needs a value}"; shift ;;
    --records=*) records="${1#*=}" ;;
    --jobs) jobs="${2:?--jobs needs a value}"; shift ;;
    --jobs=*) jobs="${1#*=}" ;;
    --run_name|--run_name=*|--resume|--resume=*)
      echo "run_all.sh: $1 is set per run here; it cannot be passed through" >&2; exit 2 ;;
    -h|--help) usage; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done
case "$preset" in
  paper) ;;
  official) extra=(--preset "$preset" "${extra[@]}"); out_dir="$out_dir/$preset" ;;
  *) echo "run_all.sh: unknown --preset '$preset' (paper or official)" >&2; exit 2 ;;
esac
report="${report:-$out_dir/results.md}"
if [ -z "$records" ] && [ -z "$override" ] && [ "$out_given" = 0 ]; then
  records="docs/records"; [ "$preset" = paper ] || records="docs/records/$preset"
fi
case "$jobs" in ''|*[!0-9]*|0) echo "run_all.sh: --jobs must be a positive integer, got '$jobs'" >&2; exit 2 ;; esac

trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; s="${s%"${s##*[![:space:]]}"}"; printf '%s' "$s"; }

# Parse the table into parallel arrays, keeping the selected lines.
names=(); tables=(); rows=(); expects=(); argstrs=()
declare -A line_of_args=()  # every line's arguments -> its name (an iterative line's plain run: its own minus --il)
while IFS='|' read -r c_name c_table c_row c_expect c_args; do
  c_name=$(trim "$c_name"); [ -z "$c_name" ] && continue
  case "$c_name" in \#*) continue ;; esac
  c_table=$(trim "$c_table"); c_row=$(trim "$c_row"); c_expect=$(trim "$c_expect"); c_args=$(trim "$c_args")
  if [ -z "$c_args" ]; then echo "run_all.sh: malformed line for '$c_name' (5 '|' columns expected)" >&2; exit 2; fi
  line_of_args["$c_args"]="$c_name"
  if [ -n "$only" ] && [[ ",$only," != *",$c_table,"* ]] && [[ ",$only," != *",$c_name,"* ]]; then continue; fi
  names+=("$c_name"); tables+=("$c_table"); rows+=("$c_row"); expects+=("$c_expect"); argstrs+=("$c_args")
done <<< "$RUN_TABLE"
if [ ${#names[@]} -eq 0 ]; then echo "run_all.sh: no run matches --only '$only'" >&2; exit 2; fi

# The command of line i, in the array "cmd": run.sh's positional arguments (dataset replaced by
# the override), the line's own flags, the pass-through flags, then the run folder.
build_cmd() {
  local i=$1 a; local -a argv
  read -r -a argv <<< "${argstrs[$i]}"
  [ -n "$override" ] && argv[1]="$override"
  cmd=(bash run.sh "${argv[@]}" "${extra[@]}" --run_name "${names[$i]}" --out_dir "$out_dir")
  local dir="$out_dir/${names[$i]}"
  if [ ! -f "$dir/results.json" ] && [ -f "$dir/checkpoint.pt" ]; then cmd+=(--resume "$dir"); return 0; fi
  # An iterative line whose plain run (the same arguments without --il) is finished starts from that run's
  # final checkpoint (train.py --il_from checks that the flags agree): its first --epochs epochs are that run.
  local plain="${argstrs[$i]% --il}" base
  if [ "$plain" != "${argstrs[$i]}" ] && [ -z "$override" ]; then
    base="${line_of_args[$plain]:-}"
    if [ -n "$base" ] && [ -f "$out_dir/$base/results.json" ]; then cmd+=(--il_from "$out_dir/$base"); fi
  fi
  return 0
}

# A line whose run folder is gone but whose record (--records) holds its finished run is done as well: a
# pass skips it unless --only names it, which runs it again (the report then keeps the earlier record under
# <records>/superseded/).
status_of() {
  local dir="$out_dir/$1"
  if [ -f "$dir/results.json" ]; then echo done
  elif [ -f "$dir/checkpoint.pt" ]; then echo resume
  elif [ -n "$records" ] && [ -f "$records/$1.json" ]; then echo "done (record)"
  else echo todo; fi
}
named() { [[ ",$only," == *",$1,"* ]]; }
# Whether a line of status $1 and name $2 is run at all: not when finished, nor when only its record is left
# and --only does not name it.
finished_status() { [ "$1" = done ] || { [ "$1" = "done (record)" ] && ! named "$2"; }; }
finished_line() { finished_status "$(status_of "${names[$1]}")" "${names[$1]}"; }

data_root="${DATA_ROOT:-data/mmkb-datasets}"
# The dataset folder of line i in "dir" ("" for the embedded default).
dataset_dir_of() {
  local -a argv; read -r -a argv <<< "${argstrs[$1]}"
  local ds="${override:-${argv[1]}}"
  case "$ds" in
    default|embedded) dir="" ;;
    */*) dir="$ds" ;;
    *) dir="$data_root/$ds" ;;
  esac
}
# Table 2's w/o v on a dataset without image features is the full model: its line is not run, and the
# report shows the full model's run in its place (the same arguments with <without> 0).
image_free_line() {
  local -a argv; read -r -a argv <<< "${argstrs[$1]}"
  [ "${tables[$1]}" = table2 ] && [ "${argv[4]}" = 1 ] || return 1
  dataset_dir_of "$1"
  [ -n "$dir" ] && [ -d "$dir" ] && ! compgen -G "$dir/*_id_img_feature_dict.pkl" > /dev/null || return 1
  argv[4]=0
  full_run="${line_of_args["${argv[*]}"]:-the full model}"
}

if [ "$list_only" = 1 ]; then
  for i in "${!names[@]}"; do
    build_cmd "$i"
    st=$(status_of "${names[$i]}")
    [[ "$st" != done* ]] && image_free_line "$i" && st="not run: no image features, = $full_run"
    printf '%s  # %s | %s | paper Hits@1 %s | %s\n' "${cmd[*]}" "${tables[$i]}" "${rows[$i]}" \
      "${expects[$i]}" "$st"
  done
  exit 0
fi

# Every dataset folder the runs still to do need must exist before the first one starts (as run.sh
# resolves it: a name under $DATA_ROOT, a path, or the embedded default).
missing=()
for i in "${!names[@]}"; do
  finished_line "$i" && continue
  dataset_dir_of "$i"
  [ -z "$dir" ] && continue
  if [ ! -d "$dir" ] && [[ " ${missing[*]:-} " != *" $dir "* ]]; then missing+=("$dir"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "run_all.sh: no run started: dataset folder(s) missing: ${missing[*]}. Build each from the raw MMKB"
    echo "files (docs/data.md; about 4 minutes per dataset on 2 CPU cores), e.g."
    for dir in "${missing[@]}"; do
      echo "  python -m data_process.build_mmkb --mmkb <mmkb root> --dataset $(basename "$dir") --out $(dirname "$dir")"
    done
    echo "or run the lines on the embedded synthetic pair: bash run_all.sh --dataset-override default ..."
  } >&2
  exit 2
fi

# GPUs: the ids in CUDA_VISIBLE_DEVICES when set, else one per line of `nvidia-smi -L`.
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=',' read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  for ((g = 0; g < ${n:-0}; g++)); do gpus+=("$g"); done
fi

mkdir -p "$out_dir"
failed_file=$(mktemp "${TMPDIR:-/tmp}/run_all_failed.XXXXXX")
trap 'rm -f "$failed_file"' EXIT

# The report (and the records), one writer at a time when runs finish together.
write_report() {
  [ "$do_report" = 1 ] || return 0
  local args=(--runs "$out_dir" --out "$report" --figures "$(dirname "$report")/figures")
  [ -n "$records" ] && args+=(--records "$records" --save_records)
  [ -f "${report%.md}_notes.md" ] && args+=(--notes "${report%.md}_notes.md")  # the page's notes, kept beside it
  (
    command -v flock >/dev/null 2>&1 && flock 9
    python -m data_process.report "${args[@]}" > /dev/null || echo "run_all.sh: the report failed" >&2
  ) 9> "$out_dir/.report.lock"
}

# One run: its command goes to command.txt, its output to stdout.txt, one status line here.
run_one() {
  local i=$1 gpu=$2 dir="$out_dir/${names[$1]}" t0 rc
  build_cmd "$i"
  mkdir -p "$dir"
  printf '%s\n' "${cmd[*]}" > "$dir/command.txt"
  t0=$(date +%s)
  if [ -n "$gpu" ]; then
    CUDA_VISIBLE_DEVICES="$gpu" "${cmd[@]}" > "$dir/stdout.txt" 2>&1; rc=$?
  elif [ "$jobs" -gt 1 ]; then  # several runs on the CPU: one thread each (two-thread runs side by side crawl)
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${cmd[@]}" > "$dir/stdout.txt" 2>&1; rc=$?
  else
    "${cmd[@]}" > "$dir/stdout.txt" 2>&1; rc=$?
  fi
  if [ "$rc" -eq 0 ]; then
    echo "  ${names[$i]}: ok ($(( $(date +%s) - t0 )) s)${gpu:+ on GPU $gpu}"
    write_report  # after every finished run: its record kept, the page up to date
  else
    echo "  ${names[$i]}: FAILED (exit $rc); last lines of $dir/stdout.txt:"
    tail -n 5 "$dir/stdout.txt" | sed 's/^/      /'
    echo "${names[$i]}" >> "$failed_file"
  fi
}

todo=()
for i in "${!names[@]}"; do
  st=$(status_of "${names[$i]}")
  if [ "$st" = done ]; then echo "skip ${names[$i]} (results.json exists)"
  elif finished_status "$st" "${names[$i]}"; then
    echo "skip ${names[$i]} (no run folder; $records/${names[$i]}.json holds its finished run: --only ${names[$i]} runs it again)"
  elif image_free_line "$i"; then echo "skip ${names[$i]} ($dir has no image features: w/o v is $full_run)"
  else todo+=("$i"); fi
done
# Slots: --jobs per GPU, or --jobs on the CPU ("" = no GPU).
slots=()
if [ ${#gpus[@]} -gt 0 ]; then
  for ((j = 0; j < jobs; j++)); do slots+=("${gpus[@]}"); done  # interleaved: the GPUs fill evenly
else
  for ((j = 0; j < jobs; j++)); do slots+=(""); done
fi
if [ ${#slots[@]} -gt 1 ]; then
  how="${#slots[@]} runs in parallel"
  [ ${#gpus[@]} -gt 0 ] && how="$how, $jobs per GPU" || how="$how on the CPU, one thread each"
else
  how=sequential
fi
echo "run_all.sh: ${#todo[@]} of ${#names[@]} runs to do, into $out_dir/ (${#gpus[@]} GPU(s): $how)"
# One run at a time on the CPU takes torch's default threads; beside another training that over-subscribes
# the cores (on the 2-core CPU: 30 s per epoch against 22 s with one thread, and the other run 23 s
# against 17 s), so say so when one is running.
if [ ${#gpus[@]} -eq 0 ] && [ "$jobs" -eq 1 ] && [ -z "${OMP_NUM_THREADS:-}" ] && [ ${#todo[@]} -gt 0 ] \
   && pgrep -f 'train[.]py' >/dev/null 2>&1; then
  echo "run_all.sh: warning: another training (train.py) is running on this machine and OMP_NUM_THREADS is" \
       "not set, so these runs take torch's default threads beside it; OMP_NUM_THREADS=1 bash run_all.sh ..." \
       "gives each one thread (--jobs N does so for its own runs)" >&2
fi

t_all=$(date +%s)
if [ ${#slots[@]} -le 1 ]; then
  k=0
  for i in "${todo[@]}"; do
    k=$((k + 1)); echo "[$k/${#todo[@]}] ${names[$i]}  (${tables[$i]} | ${rows[$i]} | paper Hits@1 ${expects[$i]})"
    run_one "$i" "${slots[0]:-}"
  done
else
  slot_pid=()
  for i in "${todo[@]}"; do
    free=""
    while [ -z "$free" ]; do
      for s in "${!slots[@]}"; do
        pid="${slot_pid[$s]:-}"
        if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then free=$s; break; fi
      done
      [ -z "$free" ] && { wait -n 2>/dev/null || sleep 1; }
    done
    echo "start ${names[$i]}${slots[$free]:+ on GPU ${slots[$free]}}  (${tables[$i]} | ${rows[$i]} | paper Hits@1 ${expects[$i]})"
    run_one "$i" "${slots[$free]}" &
    slot_pid[$free]=$!
  done
  wait
fi

n_failed=$(grep -c . "$failed_file" || true)
echo "run_all.sh: finished in $(( $(date +%s) - t_all )) s; ${n_failed} failed"
write_report
if [ "$n_failed" -gt 0 ]; then
  echo "failed runs (rerun bash run_all.sh to retry only these): $(tr '\n' ' ' < "$failed_file")" >&2
  exit 1
fi
exit 0
}
