# Shared by start.sh and stop.sh: where the dev cluster keeps its state, and pid-file helpers.
# Everything (configs, munge key and socket, mariadb datadir, spool, pid files, logs) lives
# under one folder, so stopping touches only what this folder started.
DEVCLUSTER_DIR=${HPCBRAIN_DEVCLUSTER_DIR:-/tmp/hpcbrain-devcluster}
DEVCLUSTER_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CTLD_PORT=${HPCBRAIN_DEVCLUSTER_CTLD_PORT:-16817}
DBD_PORT=${HPCBRAIN_DEVCLUSTER_DBD_PORT:-16819}
DB_PORT=${HPCBRAIN_DEVCLUSTER_DB_PORT:-16306}
NODE1_PORT=17001
NODE2_PORT=17002
NODE_CPUS=${HPCBRAIN_DEVCLUSTER_NODE_CPUS:-2}
NODE_MEM_MB=${HPCBRAIN_DEVCLUSTER_NODE_MEM_MB:-4000}

SLURM_CONF_FILE=$DEVCLUSTER_DIR/etc/slurm.conf
MUNGE_SOCKET=$DEVCLUSTER_DIR/munge/munge.socket
DB_SOCKET=$DEVCLUSTER_DIR/mysql/mysqld.sock
HOSTS_MARKER="# hpcbrain-devcluster"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

say() { echo "devcluster: $*" >&2; }
die() { echo "devcluster: error: $*" >&2; exit 1; }

# pid_of FILE NAME: the pid in FILE if that process is alive and is NAME, else nothing. The
# name check keeps a stale pid file from pointing us at an unrelated process that reused the pid.
pid_of() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' < "$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    echo "$pid"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local tries=$((seconds * 2))
    while ((tries-- > 0)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

# The daemons as "pid-file name" pairs, in start order.
daemons() {
    echo "$DEVCLUSTER_DIR/munge/munged.pid munged"
    echo "$DEVCLUSTER_DIR/run/mariadb.pid mariadbd"
    echo "$DEVCLUSTER_DIR/run/slurmdbd.pid slurmdbd"
    echo "$DEVCLUSTER_DIR/run/slurmctld.pid slurmctld"
    echo "$DEVCLUSTER_DIR/run/slurmd-node1.pid slurmd"
    echo "$DEVCLUSTER_DIR/run/slurmd-node2.pid slurmd"
}

# /etc/hosts is often a bind mount (containers): rewrite it in place, never rename over it.
hosts_remove_line() {
    grep -q "$HOSTS_MARKER" /etc/hosts 2>/dev/null || return 0
    local kept
    kept=$(grep -v "$HOSTS_MARKER" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
}
