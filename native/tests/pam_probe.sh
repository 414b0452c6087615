#!/bin/sh
# Stacked after pam_ovirt_cred.so by the tests, through pam_exec.so expose_authtok:
# records what the module handed on (PAM_USER from the environment, PAM_AUTHTOK on
# stdin) in the file named by $1, so a test can compare it with what the host sent.
set -eu
out="$1"
{
    printf 'user=%s\n' "${PAM_USER-}"
    printf 'authtok='
    tr -d '\000'
    printf '\n'
} > "$out.tmp"
mv "$out.tmp" "$out"
