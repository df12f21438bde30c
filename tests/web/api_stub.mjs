export const listeners = {};
export const api = { addEventListener(t, f) { listeners[t] = f; } };
