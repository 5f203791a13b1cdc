#!/usr/bin/env bash
# Long functions and long files, so the figures in notes and reviews can be
# reproduced: every `fn` with a body of more than FN_MAX lines (default 100), and
# every .rs file of more than FILE_MAX lines (default 800), longest first.
#
#   scripts/fnlen.sh                      # controller/src shared/src agent/src
#   scripts/fnlen.sh controller/src       # only these directories (or files)
#   FN_MAX=50 FILE_MAX=400 scripts/fnlen.sh shared/src
#
# A function's length runs from its `fn` line to the `}` that closes it, both
# included. The code is rustfmt's, so that `}` is the first line after the
# signature that sits at the `fn`'s own indentation; a `fn` without a body (a
# trait's declaration) ends at a `;` at that indentation and is not counted.
# Test functions count like any other (a `#[cfg(test)]` module is code to read
# too); the name is prefixed with the `impl` or `mod` it sits in when that is at
# the top level of the file.
set -euo pipefail
cd "$(dirname "$0")/.."
fn_max=${FN_MAX:-100}
file_max=${FILE_MAX:-800}
if [ $# -eq 0 ]; then
    set -- controller/src shared/src agent/src
fi
files=$(find "$@" -name '*.rs' -type f | sort)

echo "functions over $fn_max lines:"
# shellcheck disable=SC2086
awk -v max="$fn_max" '
    function indent(s) { match(s, /^ */); return RLENGTH }
    FNR == 1 { depth = 0; nopen = 0; outer = "" }
    # The item at the top level a nested fn belongs to: `impl X` / `mod x`.
    /^(pub(\([a-z]+\))? )?(impl|mod|trait)[ <]/ {
        outer = $0
        sub(/ *\{ *$/, "", outer)
        sub(/^pub(\([a-z]+\))? /, "", outer)
        sub(/ where.*$/, "", outer)
    }
    {
        # Close the open functions whose closing line this is.
        while (nopen > 0 && indent($0) == ind[nopen] && $0 ~ /^ *(\}|.*;$)/) {
            if ($0 ~ /^ *\} *$/) {
                len = FNR - start[nopen] + 1
                if (len > max) printf "%5d  %s:%d  %s\n", len, FILENAME, start[nopen], name[nopen]
            }
            nopen--
        }
    }
    /^ *(pub(\([a-z:]+\))? )?(const )?(async )?(unsafe )?(extern "C" )?fn [A-Za-z_0-9]+/ {
        line = $0
        n = line
        sub(/^.*fn /, "", n)
        sub(/[<(].*$/, "", n)
        if (indent(line) > 0 && outer != "") n = outer "::" n
        # A one-line declaration or body: nothing to track.
        if (line ~ /;$/ || line ~ /\}$/) next
        nopen++
        start[nopen] = FNR
        ind[nopen] = indent(line)
        name[nopen] = n
    }
' $files | sort -rn

echo "files over $file_max lines:"
# shellcheck disable=SC2086
wc -l $files | awk -v max="$file_max" '$2 != "total" && $1 > max { printf "%5d  %s\n", $1, $2 }' | sort -rn
