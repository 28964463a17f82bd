// Shared by the node tests: the repository root, and running the Python side (tests/pyside.py).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const JS_ROOT = fileURLToPath(new URL('..', import.meta.url));
export const REPO_ROOT = path.resolve(JS_ROOT, '..', '..');
const VENV_PYTHON = path.join(REPO_ROOT, '.venv', 'bin', 'python');
export const PYTHON = process.env.CIPHERBERT_PYTHON || (fs.existsSync(VENV_PYTHON) ? VENV_PYTHON : 'python3');

/** Run test/pyside.py with the repository on PYTHONPATH; returns stdout. @param {string[]} args */
export function pyside(...args) {
  return execFileSync(PYTHON, [path.join(JS_ROOT, 'test', 'pyside.py'), ...args], {
    env: { ...process.env, PYTHONPATH: REPO_ROOT, OMP_NUM_THREADS: '1' },
    encoding: 'utf8',
    maxBuffer: 1 << 28,
  });
}
