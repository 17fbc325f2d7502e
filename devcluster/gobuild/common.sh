# Sourced by every component script (and part of every component's cache key): the Go build
# environment and two module helpers. Flags that change how binaries are built belong here or in
# the component's own script, never in build.sh (which is not part of any key).
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

# The folder / go.mod file of a module version, from the module cache (downloading it if needed).
moddir() { go mod download -json "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])'; }
modfile() { go mod download -json "$1" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])'; }
