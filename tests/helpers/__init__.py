"""What the tests share and are not tests themselves: the ComfyUI host and the pack imported as a
package (comfy_host), a headless ComfyUI server (comfy_server) and a browser on its front end
(browser_ui), the tiny LTXAV checkpoints (tiny_ltxav), the float64-reference tolerance rule
(numerics), and the sequence-parallel cases and their multi-process runner (sp_cases, sp_harness).

Imported as ``helpers.<module>``: pytest puts tests/ on sys.path (conftest.py's folder, the default
"prepend" import mode), and spawned rank processes inherit that path.
"""
