#!/usr/bin/env bash
# Checks how benchmarks/setup_peers.sh wires its venv to the project's packages (not CI; ~1 minute, no network).
#
#   bash benchmarks/test_setup_peers.sh                 # the wiring only (SETUP_PEERS_SKIP_BUILD=1), both cases
#   bash benchmarks/test_setup_peers.sh --full          # then one full build from inside a venv (4-8 min, network)
#   bash benchmarks/test_setup_peers.sh --script PATH   # check another copy of setup_peers.sh (e.g. an older one)
#
# Case (a): PYTHON is the system python3 (set BASE_PYTHON for another; it must import torch and sentencepiece).
# Case (b): PYTHON is the python of a fresh venv made from it with --system-site-packages (so it sees torch) into
# which a marker module goes that the system python3 lacks: the peer venv must import the marker, as it must
# import torch from where PYTHON imports it. A venv made with --system-site-packages from a venv's python sees
# the base interpreter's site-packages only, so it fails the marker check: the bug this guards against.
# In both cases the peer venv's own packages must come before the project's on sys.path (a module dropped into the
# peer's site-packages shadows the project's sentencepiece), and a PYTHON without torch must stop the script with
# exit status 2 and one line on stderr. Everything goes into one temporary directory, removed at the end.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT=$HERE/setup_peers.sh
FULL=0
while (($#)); do
  case $1 in
    --full) FULL=1; shift ;;
    --script) SCRIPT=$(realpath "$2"); shift 2 ;;
    *) echo "usage: bash $0 [--full] [--script PATH]" >&2; exit 2 ;;
  esac
done
BASE_PYTHON=${BASE_PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/test_setup_peers.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"   # so that no module of the checkout, nor of the caller's directory, is imported by accident
FAILS=0

check() {  # check DESCRIPTION COMMAND...: runs the command, prints ok/FAIL with its output on failure
  local out
  if out=$("${@:2}" 2>&1); then echo "ok    $1"; else echo "FAIL  $1"; sed 's/^/      /' <<<"$out"; FAILS=$((FAILS + 1)); fi
}

pip_sees_outside() {  # pip_sees_outside PEER: pip lists torch, but not among the venv's own (--local) packages
  local all own
  all=$("$1/bin/python" -m pip list --format=freeze --disable-pip-version-check) || return 1
  own=$("$1/bin/python" -m pip list --local --format=freeze --disable-pip-version-check) || return 1
  grep -qi '^torch==' <<<"$all" || { echo "pip list lacks torch"; return 1; }
  ! grep -qi '^torch==' <<<"$own" || { echo "pip list --local shows torch"; return 1; }
}

site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# wiring CASE PYTHON: runs setup_peers.sh with SETUP_PEERS_SKIP_BUILD=1 and checks the peer venv it makes.
wiring() {
  local case=$1 python=$2 peer=$TMP/peer-$1
  echo "== case $case: PYTHON=$python"
  if ! PYTHON=$python SETUP_PEERS_SKIP_BUILD=1 bash "$SCRIPT" "$peer" >"$TMP/log-$case" 2>&1 \
      || [[ ! -x $peer/bin/python ]]; then
    echo "FAIL  $case: setup_peers.sh made no venv"; sed 's/^/      /' "$TMP/log-$case"; FAILS=$((FAILS + 1)); return
  fi
  if grep -q "SETUP_PEERS_SKIP_BUILD=1" "$TMP/log-$case"; then :; else
    echo "note  $case: the script ignores SETUP_PEERS_SKIP_BUILD (an older copy?)"; fi
  local torch_file
  torch_file=$("$python" -c 'import torch; print(torch.__file__)')
  check "$case: the peer imports torch and sentencepiece, torch from $torch_file" \
    "$peer/bin/python" -c "import sentencepiece, torch; assert torch.__file__ == '$torch_file', torch.__file__"
  check "$case: the peer imports transformers as PYTHON does" "$peer/bin/python" -c "import transformers"
  if [[ $case == b ]]; then
    check "$case: the peer imports the marker that only PYTHON's venv holds" \
      "$peer/bin/python" -c "import setup_peers_marker as m; assert m.WHERE == 'project venv', m.WHERE"
  fi
  # The peer venv's own packages win: its site-packages come before the project's, and a module there shadows them.
  check "$case: the peer's site-packages precede every site-packages of PYTHON on sys.path" "$peer/bin/python" -c "
import sys, sysconfig
project = set('''$("$python" -c 'import site; print(*site.getsitepackages(), sep="\n")')'''.split('\n'))
own = sys.path.index(sysconfig.get_paths()['purelib'])
later = [p for p in sys.path[:own] if p in project]
assert not later, (sys.path, later)"
  echo "WHERE = 'peer venv'" >"$(site_of "$peer/bin/python")/sentencepiece.py"
  check "$case: a module in the peer venv shadows the project's sentencepiece" \
    "$peer/bin/python" -c "import sentencepiece as m; assert getattr(m, 'WHERE', None) == 'peer venv', m.__file__"
  rm "$(site_of "$peer/bin/python")/sentencepiece.py"
  check "$case: the peer's pip sees the project's torch, as installed outside the venv" pip_sees_outside "$peer"
}

"$BASE_PYTHON" -c 'import torch, sentencepiece' || {
  echo "error: $BASE_PYTHON cannot import torch and sentencepiece; set BASE_PYTHON to the project's python" >&2
  exit 2; }

# (a) the system python3 itself.
wiring a "$BASE_PYTHON"

# (b) a venv's python: --system-site-packages lets it import torch; the marker goes only into the venv.
"$BASE_PYTHON" -m venv --without-pip --system-site-packages "$TMP/project-venv"
echo "WHERE = 'project venv'" >"$(site_of "$TMP/project-venv/bin/python")/setup_peers_marker.py"
if "$BASE_PYTHON" -c 'import setup_peers_marker' 2>/dev/null; then
  echo "error: $BASE_PYTHON itself imports setup_peers_marker; case (b) would prove nothing" >&2; exit 2; fi
wiring b "$TMP/project-venv/bin/python"

# A PYTHON without torch: exit status 2, one line on stderr, no venv made.
echo "== a PYTHON that cannot import torch"
"$BASE_PYTHON" -m venv --without-pip "$TMP/bare-venv"
set +e
PYTHON=$TMP/bare-venv/bin/python SETUP_PEERS_SKIP_BUILD=1 bash "$SCRIPT" "$TMP/peer-bare" >/dev/null 2>"$TMP/err"
rc=$?
set -e
check "PYTHON without torch: exit status 2 (got $rc)" test "$rc" = 2
check "PYTHON without torch: one line on stderr: $(head -c 200 "$TMP/err")" test "$(wc -l <"$TMP/err")" = 1
check "PYTHON without torch: no venv made" test ! -e "$TMP/peer-bare"

if ((FULL)); then
  echo "== full build with PYTHON=$TMP/project-venv/bin/python (4-8 minutes)"
  if PYTHON=$TMP/project-venv/bin/python bash "$SCRIPT" "$TMP/peer-full" >"$TMP/log-full" 2>&1; then
    tail -n 3 "$TMP/log-full" | sed 's/^/      /'
    check "full: chatglm_cpp from the peer venv, its converter with PYTHON's torch and the marker" \
      "$TMP/peer-full/bin/python" -c "
import chatglm_cpp, chatglm_cpp.convert, torch, setup_peers_marker
assert chatglm_cpp.__file__.startswith('$TMP/peer-full/'), chatglm_cpp.__file__
assert torch.__file__ == '$("$BASE_PYTHON" -c 'import torch; print(torch.__file__)')', torch.__file__
print(chatglm_cpp.__version__)"
    check "full: the thread-count shim is built" test -f "$TMP/peer-full/lib/libhardware_concurrency.so"
  else
    echo "FAIL  full: setup_peers.sh failed"; tail -n 30 "$TMP/log-full" | sed 's/^/      /'; FAILS=$((FAILS + 1))
  fi
fi

if ((FAILS)); then echo "$FAILS check(s) failed"; exit 1; fi
echo "all checks passed"
