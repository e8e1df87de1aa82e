"""An interactive problem for pipeline tests: an interactor that answers guesses of a
number with higher/lower, and a solution that finds it by binary search (busybox sh)."""

SECRET = 37

# Says whether each guess is too low or too high; 0 once it is found, 1 if the solution
# gives up (EOF) first.
INTERACTOR = f"""
n=0
while read g; do
  n=$((n+1))
  if [ "$g" -lt {SECRET} ]; then echo higher
  elif [ "$g" -gt {SECRET} ]; then echo lower
  else echo correct; echo "found in $n" >&2; exit 0; fi
done
echo "the solution stopped guessing" >&2; exit 1
"""
# Binary search over 1..100.
SOLUTION = """
lo=1; hi=100
while :; do
  g=$(((lo+hi)/2)); echo $g; read r
  case $r in higher) lo=$((g+1));; lower) hi=$((g-1));; correct) exit 0;; *) exit 3;; esac
done
"""
