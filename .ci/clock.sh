# Sourced by .ci/run and .ci/background: the CPU time, in whole seconds,
# that the sourcing script and the children it has waited for took (user
# and system time, from /proc/$$/stat).
hz=$(getconf CLK_TCK)
cpu_seconds() {
    local st
    read -r -a st < /proc/$$/stat
    echo $(((st[13] + st[14] + st[15] + st[16]) / hz))
}
