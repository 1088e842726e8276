# Sourced by the device scripts: the carried wheels (omegaconf, antlr4, ...) into /tmp/site, and the package
# metadata that registers fd's built-in node types through the fd.nodes entry point (the copied tree is not
# pip-installed there, and the engine finds node types only through entry points).
# A call on a warm machine that carried .whl before may leave it out (room in the carry for other wheels).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
elif [ ! -d /tmp/site/omegaconf ]; then
  echo "device_env: no .whl carried and none installed on this machine (carry .whl)"; exit 1
fi
mkdir -p /tmp/site/fdreams-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: fdreams\nVersion: 0.1.0\n' > /tmp/site/fdreams-0.1.0.dist-info/METADATA
printf '[fd.nodes]\nbuiltin = nodes:builtin_node_types\n' > /tmp/site/fdreams-0.1.0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
