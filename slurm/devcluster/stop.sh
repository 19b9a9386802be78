#!/usr/bin/env bash
# Stop the dev cluster started by start.sh: cancel its jobs, then stop slurmd and slurmctld,
# slurmdbd, mariadb and munged, each by the pid in its own pid file (never by name), and remove
# the node1/node2 line from /etc/hosts. Stopping a stopped cluster does nothing.
#
#   slurm/devcluster/stop.sh            # keep the state folder (logs, accounting database)
#   slurm/devcluster/stop.sh --purge    # and delete it
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$SLURM_CONF_FILE

# stop_group "FILE NAME" ...: SIGTERM to every daemon of the group, wait up to 20 s for all of
# them, then SIGKILL the ones left. Daemons of one group stop in parallel.
stop_group() {
    local entry file name pid pids=() names=() files=()
    for entry in "$@"; do
        read -r file name <<< "$entry"
        if pid=$(pid_of "$file" "$name"); then
            kill -TERM "$pid" 2>/dev/null
            pids+=("$pid"); names+=("$name"); files+=("$file")
        else
            rm -f "$file"
        fi
    done
    local i left
    for _ in $(seq 100); do
        left=0
        for i in "${!pids[@]}"; do
            kill -0 "${pids[$i]}" 2>/dev/null && left=1
        done
        ((left)) || break
        sleep 0.2
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            say "${names[$i]} (${pids[$i]}) ignored SIGTERM for 20 s: SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null
        else
            say "stopped ${names[$i]} (${pids[$i]})"
        fi
        rm -f "${files[$i]}"
    done
}

if pid_of "$DEVCLUSTER_DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        scancel $jobs 2>/dev/null
        for _ in $(seq 60); do
            [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi
stop_group "$DEVCLUSTER_DIR/run/slurmd-node1.pid slurmd" "$DEVCLUSTER_DIR/run/slurmd-node2.pid slurmd" \
           "$DEVCLUSTER_DIR/run/slurmctld.pid slurmctld"
stop_group "$DEVCLUSTER_DIR/run/slurmdbd.pid slurmdbd"
stop_group "$DEVCLUSTER_DIR/run/mariadb.pid mariadbd"
stop_group "$DEVCLUSTER_DIR/munge/munged.pid munged"
if [[ $(id -u) == 0 ]]; then
    hosts_remove_line
fi
if [[ ${1:-} == --purge && -d $DEVCLUSTER_DIR ]]; then
    rm -rf "$DEVCLUSTER_DIR"
    say "removed $DEVCLUSTER_DIR"
fi
say "stopped"
exit 0
