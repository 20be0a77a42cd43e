# Sourced by bin/install and bin/test-packaging.
# python_for 3.12: a working interpreter for that version (python3.12 on PATH, else one of pyenv's
# versions, whose shims exist but fail for versions that are not pyenv's global ones).
python_for() {
  local candidate
  for candidate in "python$1" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1"; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$1'.split('.')))" \
        >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
SUPPORTED_PYTHONS=(3.11 3.12 3.13)
