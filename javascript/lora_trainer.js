// lora_trainer: browser-side helpers for the training tab.
// Copies a <lora:name:weight> tag into the txt2img prompt (A1111 and Forge expose gradioApp()).
function loraTrainerSendToTxt2img(tag) {
    const app = typeof gradioApp === "function" ? gradioApp() : document;
    const box = app.querySelector("#txt2img_prompt textarea");
    if (!box || !tag) return [];
    box.value = box.value ? box.value.trimEnd() + " " + tag : tag;
    box.dispatchEvent(new Event("input", { bubbles: true }));
    return [];
}
