#!/bin/sh
# The nginx stand-in's template step (see Containerfile): every *.template under
# /etc/nginx/templates becomes the same path under /etc/nginx/conf.d without the suffix, with
# ${NAME} and $NAME replaced for the environment variables that are defined (and match
# NGINX_ENVSUBST_FILTER when it is set); anything else, like nginx's own $host, stays.
set -e

template_dir="${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}"
suffix="${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}"
output_dir="${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"
filter="${NGINX_ENVSUBST_FILTER:-}"

[ -d "$template_dir" ] || exit 0
defined_envs=$(printf '${%s} ' $(env | cut -d= -f1 | grep -E "${filter:-.}"))

find "$template_dir" -follow -type f -name "*$suffix" -print | while read -r template; do
    relative_path="${template#"$template_dir"/}"
    output_path="$output_dir/${relative_path%"$suffix"}"
    mkdir -p "$(dirname "$output_path")"
    echo "$0: Running envsubst on $template to $output_path"
    envsubst "$defined_envs" < "$template" > "$output_path"
done
