#!/bin/bash
# Samples a process's CPU seconds (utime+stime ticks) every 2 s: benchmarks/cpu_poll.sh PID OUT.log
pid=$1; out=$2; tck=$(getconf CLK_TCK)
while kill -0 $pid 2>/dev/null; do
  read -r -a f < /proc/$pid/stat
  echo "$(date +%s.%N) $(( (${f[13]} + ${f[14]}) )) $tck" >> $out
  sleep 2
done
