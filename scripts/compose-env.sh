#!/usr/bin/env sh
# Give docker compose the MinIO credentials it requires: writes random MINIO_ACCESS_KEY and MINIO_SECRET_KEY
# into .env (compose reads it from the project directory), or into the file named as the first argument.
# A variable the file already sets is kept, and so is everything else in it; the file is readable by you only.
# Read them back with: grep MINIO_ .env   (MinIO's console at http://127.0.0.1:9001 takes the same pair)
set -eu
env_file="${1:-}"
if [ -z "$env_file" ]; then
  cd "$(dirname "$0")/.."
  env_file=.env
fi
random_hex() {  # random_hex BYTES: that many random bytes as hex (only [0-9a-f]: safe in .env and in sh)
  od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}
umask 077
touch "$env_file"
chmod 600 "$env_file"
added=""
add() {  # add NAME VALUE: append NAME=VALUE unless the file sets NAME already
  if ! grep -q "^$1=." "$env_file"; then
    kept=$(grep -v "^$1=\$" "$env_file" || true)  # an empty NAME= line (as in .env.example) gives way
    if [ -n "$kept" ]; then printf '%s\n' "$kept" >"$env_file"; else : >"$env_file"; fi
    echo "$1=$2" >>"$env_file"
    added="$added $1"
  fi
}
add MINIO_ACCESS_KEY "c3render-$(random_hex 6)"
add MINIO_SECRET_KEY "$(random_hex 24)"
if [ -n "$added" ]; then
  echo "wrote$added to $env_file (random; kept there for every later docker compose command)"
else
  echo "$env_file already sets MINIO_ACCESS_KEY and MINIO_SECRET_KEY; nothing changed"
fi
